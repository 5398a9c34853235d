"""Trainable masks per training stage, the optimiser and LoRA a config asks for, and the jitted train
step (frozen parameters get no gradient and no optimiser state) that the trainer and the planner run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from m3d_jax.sharding import activation_mesh, batch_sharding
from m3d_jax.train.lora import LoraConfig, LoraParam, lora_dropout
from m3d_jax.train.optim import OptimConfig
from m3d_jax.train.tasks import Task

# Parameter-path prefixes trained in each stage (REFERENCE §1.7, §3).
STAGES: dict[str, tuple[str, ...]] = {
    "lamed_stage1": ("mm_projector", "language_model/embed_tokens"),
    "lamed_stage2": ("vision_tower", "mm_projector", "language_model", "seg_projector", "seg_module"),
    "frozen_vision": ("mm_projector", "language_model", "seg_projector", "seg_module"),  # all but the ViT
    # Med-2E3 (M3D-CLIP stays frozen in both): connectors (incl. text_mlp), then + LLM and SigLIP in full.
    "med2e3_stage1": ("vision2d_connector", "vision3d_connector"),
    "med2e3_stage2": ("llm", "vision2d_model", "vision2d_connector", "vision3d_connector"),
    # Med3DInsight pretraining: everything but the segmentation head (nnFormer `final`, UNETR `out`; torch
    # Adam skips it: no gradient).
    "med3dinsight_pretrain": ("backbone/model_down", "backbone/decoder", "backbone/res", "backbone/vit",
                              "backbone/encoder", "res", "psat", "L"),
    "linear_probe": ("head",),  # fine-tuning: only the classification head
    "full": ("",),
}


# With LoRA, these language-model parameters are still trained fully (the recipe's embeddings and lm_head).
LORA_FULLY_TRAINED = ("language_model/embed_tokens", "language_model/lm_head")


def trainable(stage: str, lora: bool = False) -> nnx.filterlib.Filter:
    """An NNX filter selecting the parameters the stage trains. With `lora`, the language model's other
    weights are frozen and its LoRA parameters trained instead (when the stage trains the LLM)."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {sorted(STAGES)}")
    prefixes = STAGES[stage]
    trains_llm = any("language_model".startswith(prefix) for prefix in prefixes)

    def selected(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        name = "/".join(map(str, path))
        if lora and name.startswith("language_model"):
            return trains_llm and (isinstance(variable, LoraParam) or name.startswith(LORA_FULLY_TRAINED))
        return any(name.startswith(prefix) for prefix in prefixes)

    return selected


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
    """(optimiser config, trainable filter) of a config: what trains at its stage, with or without LoRA."""
    optim = OptimConfig(**{**config.optim.to_dict(),
                           "total_steps": max(1, config.total_steps // config.optim.get("accumulation_steps", 1))})
    return optim, trainable(config.stage, lora=lora_of(config) is not None)


def task_step(task: Task, graphdef: nnx.GraphDef, wrt: Any, shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """The jitted train step of a task: the state laid out by `shardings` (donated), the batch (the task's
    inputs) over the data axes, activations constrained on `mesh`. The trainer and the planner both run it."""
    batch_shardings = {key: batch_sharding(mesh, ndim) for key, ndim in task.inputs.items()}
    return make_train_step(graphdef, task.loss, wrt, state_shardings=shardings, batch_shardings=batch_shardings,
                           mesh=mesh)
