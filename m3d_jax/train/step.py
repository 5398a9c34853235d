"""Trainable masks per training stage and the jitted train step (frozen parameters get no gradient and
no optimiser state)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Parameter-path prefixes trained in each stage (REFERENCE §1.7).
STAGES: dict[str, tuple[str, ...]] = {
    "lamed_stage1": ("mm_projector", "language_model/embed_tokens"),
    "lamed_stage2": ("vision_tower", "mm_projector", "language_model", "seg_projector", "seg_module"),
    "full": ("",),
}


def trainable(stage: str) -> nnx.filterlib.Filter:
    """An NNX filter selecting the parameters the stage trains."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {sorted(STAGES)}")
    prefixes = STAGES[stage]

    def selected(path, variable) -> bool:
        name = "/".join(map(str, path))
        return isinstance(variable, nnx.Param) and any(name.startswith(prefix) for prefix in prefixes)

    return selected


def make_train_step(loss_fn: Callable, wrt: nnx.filterlib.Filter):
    """A jitted step(model, optimizer, batch) → metrics; updates the trainable parameters in place."""

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Mapping[str, jax.Array]):
        def loss(model):
            value, metrics = loss_fn(model, batch)
            return value, metrics

        (value, metrics), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        finite = jnp.isfinite(value) & jnp.isfinite(metrics["grad_norm"])
        metrics["finite"] = finite
        optimizer.update(model, grads)
        return metrics

    return train_step
