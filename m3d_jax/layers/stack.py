"""Repeated layers stored stacked (one parameter per kind with a leading "layers" axis), run either as a
Python loop or as one `jax.lax.scan` over a single compiled layer, with optional rematerialisation.

Both run modes read the same parameters, so checkpoints, converters and sharding rules do not depend on
the choice; the tests pin that they give identical numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

# A contraction this short is a low-rank product (a LoRA adapter's x·A·B): recomputing it costs 2·K FLOPs per
# output element, while saving its output costs as much memory as the full projection it is added to.
LOW_RANK = 64


def _weight_dots_saveable(prim, *avals, **params) -> bool:
    """JAX's dots_with_no_batch_dims_saveable (save weight matmul outputs, recompute attention's batched
    products), less the low-rank products: without that, a LoRA-trained LLM saves each adapted projection
    twice (measured: LaMed-Phi-3 stage 2 on v5e:4x4 needed 16.6 GiB per chip; see README, Planning a run)."""
    if not jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params):
        return False
    (lhs_contract, _), _ = params["dimension_numbers"]
    return math.prod(avals[0].shape[axis] for axis in lhs_contract) > LOW_RANK


_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": _weight_dots_saveable,
}


_UNROLLED = contextvars.ContextVar("unrolled_scans", default=False)


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """While tracing inside this context, scanned stacks are fully unrolled: the same numbers, but a
    program in which XLA's cost analysis sees every layer (it counts a loop body once)."""
    token = _UNROLLED.set(True)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num_layers` independent layers as one module whose parameters gain a leading "layers" axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return make(rngs)


def unstack(layers: nnx.Module, num_layers: int) -> nnx.List:
    """The stacked layers as a list of separate modules (one slice of each parameter per layer).

    Inside a jitted decode loop, slicing the stacked parameters again at every step copies them (XLA
    does not fuse the slices into the matmuls); slicing once before the loop avoids that: 2-3x faster
    decoding on CPU.
    """
    graphdef, state = nnx.split(layers)
    return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], state)) for i in range(num_layers)])


class StackOutput(NamedTuple):
    output: jax.Array
    hidden_states: list[jax.Array] | None  # every layer's output, with `collect`
    per_layer: Any  # what each layer returned beside x, stacked on a leading axis (e.g. updated KV caches)


def run_stack(
    layers: nnx.Module,
    x: jax.Array,
    *,
    num_layers: int,
    scan: bool = False,
    remat: RematPolicy = "none",
    collect: bool = False,
    per_layer: Any = None,
    **shared: Any,
) -> StackOutput:
    """Applies the first `num_layers` stacked layers to x in order.

    Each layer is called as `layer(x, **shared) -> x`, or, when `per_layer` (a pytree whose leaves have a
    leading layer axis, e.g. a KV cache) is given, as `layer(x, layer_slice, **shared) -> (x, layer_result)`;
    the layer results come back stacked in `StackOutput.per_layer`. `layers` may also be the list from
    `unstack` (then run as a loop whatever `scan` says), and `per_layer` a Python list with one entry per
    layer (then the results come back as a list: no slicing or re-stacking copies).
    """
    with_extra = per_layer is not None
    if isinstance(layers, nnx.List):
        layer_list = list(layers)[:num_layers]
        graphdef, state = nnx.split(layer_list[0])
        state = [nnx.state(layer) for layer in layer_list]
        scan = False
    else:
        graphdef, state = nnx.split(layers)
        if num_layers < jax.tree.leaves(state)[0].shape[0]:
            state = jax.tree.map(lambda leaf: leaf[:num_layers], state)

    def apply_layer(carry: jax.Array, layer_state: Any, layer_in: Any) -> tuple[jax.Array, Any]:
        layer = nnx.merge(graphdef, layer_state)
        return layer(carry, layer_in, **shared) if with_extra else (layer(carry, **shared), None)

    if remat != "none":
        if remat not in _POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of none, {', '.join(_POLICIES)}")
        apply_layer = jax.checkpoint(apply_layer, policy=_POLICIES[remat], prevent_cse=not scan)

    if scan:
        if isinstance(per_layer, list):
            raise ValueError("scan needs per_layer inputs stacked on a leading axis, not a list")

        def body(carry, layer_args):
            out, extra = apply_layer(carry, *layer_args)
            return out, (out if collect else None, extra)

        x, (outputs, extras) = jax.lax.scan(body, x, (state, per_layer), unroll=True if _UNROLLED.get() else 1)
        return StackOutput(x, list(outputs) if collect else None, extras)

    outputs, extras = [], []
    for index in range(num_layers):
        take = lambda leaf: leaf[index]  # noqa: E731
        if isinstance(per_layer, list):
            layer_in = per_layer[index]
        else:
            layer_in = jax.tree.map(take, per_layer) if with_extra else None
        layer_state = state[index] if isinstance(state, list) else jax.tree.map(take, state)
        x, extra = apply_layer(x, layer_state, layer_in)
        outputs.append(x)
        extras.append(extra)
    if isinstance(per_layer, list):
        return StackOutput(x, outputs if collect else None, extras)
    stacked_extras = jax.tree.map(lambda *leaves: jnp.stack(leaves), *extras) if with_extra else None
    return StackOutput(x, outputs if collect else None, stacked_extras)
