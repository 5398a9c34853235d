"""Repeated layers stored stacked (one parameter per kind with a leading "layers" axis), run either as a
Python loop or as one `jax.lax.scan` over a single compiled layer, with optional rematerialisation.

Both run modes read the same parameters, so checkpoints, converters and sharding rules do not depend on
the choice; the tests pin that they give identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
from flax import nnx

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num_layers` independent layers as one module whose parameters gain a leading "layers" axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return make(rngs)


def run_stack(
    layers: nnx.Module,
    x: jax.Array,
    *,
    num_layers: int,
    scan: bool = False,
    remat: RematPolicy = "none",
    collect: bool = False,
) -> tuple[jax.Array, list[jax.Array] | None]:
    """Applies the first `num_layers` stacked layers to x in order.

    Returns the final output and, with `collect`, the output of every layer run (a list of arrays).
    """
    graphdef, state = nnx.split(layers)
    if num_layers < jax.tree.leaves(state)[0].shape[0]:
        state = jax.tree.map(lambda leaf: leaf[:num_layers], state)

    def apply_layer(carry: jax.Array, layer_state: Any) -> jax.Array:
        return nnx.merge(graphdef, layer_state)(carry)

    if remat != "none":
        if remat not in _POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of none, {', '.join(_POLICIES)}")
        apply_layer = jax.checkpoint(apply_layer, policy=_POLICIES[remat], prevent_cse=not scan)

    if scan:
        def body(carry, layer_state):
            out = apply_layer(carry, layer_state)
            return out, (out if collect else None)

        x, outputs = jax.lax.scan(body, x, state)
        return x, (list(outputs) if collect else None)

    outputs = []
    for index in range(num_layers):
        x = apply_layer(x, jax.tree.map(lambda leaf: leaf[index], state))
        outputs.append(x)
    return x, (outputs if collect else None)
