"""Normalisation layers; statistics are computed in float32 whatever the compute dtype."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.params import DType, ones, param, zeros


class LayerNorm(nnx.Module):
    """LayerNorm over the trailing axes of `shape` (torch `nn.LayerNorm(shape)` semantics)."""

    def __init__(
        self,
        shape: int | Sequence[int],
        *,
        eps: float,
        axes: Sequence[str | None],
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, ones, self.shape, param_dtype, axes)
        self.bias = param(rngs, zeros, self.shape, param_dtype, axes)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        reduce_axes = tuple(range(inputs.ndim - len(self.shape), inputs.ndim))
        x = inputs.astype(jnp.float32)
        mean = jnp.mean(x, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=reduce_axes, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(var + self.eps)
        normed = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return normed.astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x²) + eps) · scale, statistics in float32; the normalised value is cast to the
    compute dtype before the scale multiplies it (HF Llama/Phi-3 order)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        axes: Sequence[str | None] = ("embed",),
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, ones, (features,), param_dtype, axes)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = inputs.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)
