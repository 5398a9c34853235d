"""Parameter creation with logical axis names, and dtype helpers shared by all layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.sharding import check_logical_names

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]
DType = Any


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    dtype: DType,
    axes: Sequence[str | None],
) -> nnx.Param:
    """Creates an `nnx.Param` whose metadata carries one logical axis name per dimension, each listed in
    the rules table (m3d_jax.sharding.LOGICAL_RULES) or None (kept whole)."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axis names {tuple(axes)} for a parameter of shape {tuple(shape)}")
    check_logical_names(axes, what=f"a parameter of shape {tuple(shape)}")
    # Parameters are placed by the sharded initialiser (m3d_jax.sharding), not eagerly at creation.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), sharding=tuple(axes), eager_sharding=False)


def canonical_dtype(name: DType) -> jnp.dtype:
    """Accepts 'float32', 'bfloat16', jnp.float32, ... and returns the numpy dtype object."""
    return jnp.dtype(name)


zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def normal(stddev: float) -> Initializer:
    return nnx.initializers.normal(stddev)


def truncated_normal(stddev: float) -> Initializer:
    return nnx.initializers.truncated_normal(stddev)


class Buffer(nnx.Variable):
    """A fixed array that is part of a checkpoint but never trained (e.g. SegVol's random-Fourier matrix)."""
