"""FLOPs of a training step, two ways, and the accelerators' peaks they are measured against.

  model FLOPs     3 × the forward pass's matmul and convolution FLOPs (forward + backward = 6 × matmul
                  parameters × tokens, MaxText's convention), counted from the loss's jaxpr: every stack
                  on the path, frozen ones included, a scanned stack once per layer, attention's score and
                  value products counted, causal attention as half. Remat recomputation is not counted.
  hardware FLOPs  XLA's cost analysis of the lowered step with every layer scan unrolled (XLA counts a
                  loop body once): what the chip executes, rematerialisation and elementwise work included.

MFU = model FLOPs / (step time × peak × devices); HFU the same with hardware FLOPs. The trainer, the run
planner (train/plan.py) and tools/bench/train_step.py all take their figures from `StepFlops`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.extend import core as jex_core

from m3d_jax.layers.attention import ATTENTION_SCOPE, CAUSAL_SCOPE, plain_xla_attention
from m3d_jax.layers.stack import unrolled_scans
from m3d_jax.train.lora import lora_dropout

# Dense bf16 peak FLOP/s per chip (vendor figures). TPUs by their exact `device_kind` (v5p reports
# "TPU v5", v5e "TPU v5 lite"), GPUs by a substring of it.
TPU_PEAK_FLOPS = {"TPU v6 lite": 918e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v5 lite": 197e12,
                  "TPU v4": 275e12}
GPU_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12))


def peak_flops(device: jax.Device | None = None, override: float = 0.0, devices_per_chip: int = 1) -> float | None:
    """A device's peak FLOP/s (bf16 dense; a chip's peak split over its devices), `override` if
    positive; None when unknown (e.g. CPU)."""
    if override > 0:
        return override
    kind = (device or jax.devices()[0]).device_kind
    if kind in TPU_PEAK_FLOPS:
        return TPU_PEAK_FLOPS[kind] / devices_per_chip
    for name, flops in GPU_PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops / devices_per_chip
    return None


def utilisation(flops_per_step: float | None, seconds_per_step: float, num_devices: int,
                peak: float | None) -> float | None:
    """FLOPs per step / (seconds per step × peak × devices): MFU from model FLOPs, HFU from hardware ones."""
    if not flops_per_step or not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * num_devices)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step over the global batch (see the module docstring)."""

    model: float
    hardware: float | None


def count_matmul_flops(jaxpr: jex_core.Jaxpr, scopes: frozenset[str] = frozenset()) -> float:
    """FLOPs of every dot_general and convolution in `jaxpr` and its sub-jaxprs (a scan body times its
    length, the costliest branch of a cond, a while body once), with products under the causal attention
    scope halved."""
    total = 0.0
    for eqn in jaxpr.eqns:
        here = scopes | frozenset(str(eqn.source_info.name_stack).split("/"))
        name = eqn.primitive.name
        if name == "dot_general":
            flops = _dot_flops(eqn)
            total += flops / 2 if ATTENTION_SCOPE in here and CAUSAL_SCOPE in here else flops
            continue
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
            continue
        inner = [count_matmul_flops(sub, here) for sub in _sub_jaxprs(eqn.params)]
        if not inner:
            continue
        if name == "cond":
            total += max(inner)
        elif name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    free = [size for axis, size in enumerate(rhs) if axis not in (*rhs_contract, *rhs_batch)]
    return 2.0 * math.prod(lhs) * math.prod(free)


def _conv_flops(eqn) -> float:
    kernel = eqn.invars[1].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    per_output = kernel[rhs_spec[1]] * math.prod(kernel[axis] for axis in rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def model_flops(loss_fn: Callable, graphdef: nnx.GraphDef, model_state: nnx.State, batch: Mapping[str, Any]) -> float:
    """Model FLOPs of one training step: 3 × the forward matmul / convolution FLOPs of
    `loss_fn(model, batch, rngs)` on this (global) batch. `model_state` may be abstract."""
    key = jax.random.key(0)

    def forward(state, batch):
        with lora_dropout(key):
            return loss_fn(nnx.merge(graphdef, state), batch, nnx.Rngs(dropout=key))[0]

    with plain_xla_attention():
        jaxpr = jax.make_jaxpr(forward)(model_state, batch)
    return 3.0 * count_matmul_flops(jaxpr.jaxpr)


def step_flops(loss_fn: Callable, graphdef: nnx.GraphDef, state: nnx.State, batch: Mapping[str, Any], key: Any,
               make_step: Callable[[], Any]) -> StepFlops:
    """Both counts for the train step `make_step()` over the split (model, optimizer) state (real or
    abstract) and a global batch."""
    model_graphdef, model_state = nnx.split(nnx.merge(graphdef, state)[0])
    return StepFlops(model_flops(loss_fn, model_graphdef, model_state, batch),
                     hardware_flops(make_step, state, batch, key))


def hardware_flops(make_step: Callable[[], Any], *args: Any) -> float | None:
    """XLA's FLOP count of the step that `make_step()` jits, lowered for `args` with layer scans unrolled;
    None where the backend cannot analyse the lowered program."""
    with unrolled_scans():
        lowered = make_step().lower(*args)
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 — some backends cannot analyse before compilation
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
