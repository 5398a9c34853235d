"""What trains (the config's parameter patterns, narrowed by LoRA), the optimiser and LoRA a config asks for,
and the jitted train step (frozen parameters get no gradient and no optimiser state) that the trainer and the
planner run."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from m3d_jax.errors import ConfigError
from m3d_jax.sharding import activation_mesh, batch_sharding
from m3d_jax.train.lora import LoraConfig, LoraParam, lora_dropout
from m3d_jax.train.optim import OptimConfig
from m3d_jax.train.tasks import Task


def path_matcher(patterns: Sequence[str], what: str) -> Callable[[str], bool]:
    """Whether a '/'-joined parameter path is selected by `patterns`: regular expressions, each matching the
    WHOLE path of the parameter or of a module containing it ("mm_projector" selects every parameter of
    that module, "language_model/embed_tokens" the input embeddings, ".*" everything). A bad pattern is
    named with `what` (the config key)."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ConfigError(f"{what}: {pattern!r} is not a regular expression ({error})") from None

    def matches(name: str) -> bool:
        parts = name.split("/")
        return any(regex.fullmatch("/".join(parts[:depth])) for regex in compiled
                   for depth in range(1, len(parts) + 1))

    return matches


def trainable(patterns: Sequence[str], lora: LoraConfig | None = None) -> nnx.filterlib.Filter:
    """An NNX filter selecting the parameters that train: those `patterns` select (see `path_matcher`).
    With `lora`, the base weights under `lora.under` (the LLM) are frozen: there only the LoRA adapters and
    the `lora.fully_trained` parts train, and only where `patterns` select them too."""
    if not patterns:
        raise ConfigError("config.trainable is empty: nothing would train; list the parameter patterns to "
                          "train, e.g. ('mm_projector',), or ('.*',) for everything")
    selected = path_matcher(patterns, "config.trainable")
    frozen = fully_trained = None
    if lora is not None:
        prefix = f"{re.escape(lora.under)}/" if lora.under else ""
        frozen = path_matcher(re.escape(lora.under) if lora.under else ".*", "lora.under")
        fully_trained = path_matcher([f"{prefix}(?:{part})" for part in lora.fully_trained], "lora.fully_trained")

    def trains(path: tuple, variable: Any) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        name = "/".join(map(str, path))
        if not selected(name):
            return False
        if frozen is None or not frozen(name):
            return True
        return isinstance(variable, LoraParam) or fully_trained(name)

    return trains


def unmatched_patterns(patterns: Sequence[str], model: nnx.Module) -> list[str]:
    """The patterns that select no parameter of `model` (a typo, or a part this model does not have)."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    names = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return [pattern for pattern in patterns
            if not any(map(path_matcher((pattern,), "config.trainable"), names))]


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, wrt: nnx.filterlib.Filter, *,
                    state_shardings: Any = None, batch_shardings: Any = None, mesh: Mesh | None = None) -> Callable:
    """One jitted step(state, batch, key) → (state, metrics) over the split (model, optimizer) state.

    `loss_fn(model, batch, rngs) -> (loss, metrics)`; gradients flow only to the parameters `wrt`
    selects. The state is donated and laid out by `state_shardings` on the way in and out, the batch by
    `batch_shardings`, the activations by `constrain` on `mesh`; `key` drives dropout (including LoRA
    dropout). The optimiser skips updates whose gradients are not finite (see `make_optimizer`);
    `metrics["finite"]` says whether this one was."""

    def train_step(state: nnx.State, batch: Mapping[str, jax.Array], key: jax.Array):
        model, optimizer = nnx.merge(graphdef, state)

        def loss(model):
            with lora_dropout(key), activation_mesh(mesh):
                return loss_fn(model, batch, nnx.Rngs(dropout=key))

        (value, metrics), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        metrics["finite"] = jnp.isfinite(value) & jnp.isfinite(metrics["grad_norm"])
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def lora_of(config: ConfigDict) -> LoraConfig | None:
    """The config's LoRA, or None when it trains without adapters (no section or rank 0)."""
    section = config.get("lora")
    return LoraConfig(**section) if section is not None and section.rank > 0 else None


def optimizer_of(config: ConfigDict) -> tuple[OptimConfig, Any]:
    """(optimiser config, trainable filter) of a config: what `config.trainable` selects, with or without
    LoRA."""
    if "trainable" not in config:
        raise ConfigError("the config has no `trainable`: set config.trainable to the parameter patterns that "
                          "train, e.g. ('mm_projector', 'language_model/embed_tokens'), or ('.*',) for everything")
    optim = OptimConfig(**{**config.optim.to_dict(),
                           "total_steps": max(1, config.total_steps // config.optim.get("accumulation_steps", 1))})
    return optim, trainable(config.trainable, lora_of(config))


def task_step(task: Task, graphdef: nnx.GraphDef, wrt: Any, shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """The jitted train step of a task: the state laid out by `shardings` (donated), the batch (the task's
    inputs) over the data axes, activations constrained on `mesh`. The trainer and the planner both run it."""
    batch_shardings = {key: batch_sharding(mesh, ndim) for key, ndim in task.inputs.items()}
    return make_train_step(graphdef, task.loss, wrt, state_shardings=shardings, batch_shardings=batch_shardings,
                           mesh=mesh)
