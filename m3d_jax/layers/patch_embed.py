"""Patch embeddings for volumes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from m3d_jax.layers.linear import Dense
from m3d_jax.layers.params import DType, param, truncated_normal


def sincos_position_table(grid: Sequence[int], features: int, temperature: float = 10000.0) -> jax.Array:
    """MONAI's 3D sin-cos position table [prod(grid), features] (its `pos_embed_type="sincos"`): per token,
    [sin, cos](axis 1 · ω), [sin, cos](axis 0 · ω), [sin, cos](axis 2 · ω) with ω = temperature^(−k / (features/6))."""
    if features % 6:
        raise ValueError(f"a 3D sin-cos position table needs a width divisible by 6, got {features}")
    omega = 1.0 / temperature ** (jnp.arange(features // 6, dtype=jnp.float32) / (features // 6))
    coords = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in grid], indexing="ij")
    angles = [c.reshape(-1, 1) * omega for c in coords]  # axis 0, 1, 2
    return jnp.concatenate([f(angles[axis]) for axis in (1, 0, 2) for f in (jnp.sin, jnp.cos)], axis=1)


class PerceptronPatchEmbed3D(nnx.Module):
    """MONAI's "perceptron" patch embedding: cut [B, C, D, H, W] into non-overlapping patches, flatten
    each as (p1 p2 p3 c), project linearly, add a learnable position table. Tokens run depth-slowest.

    `position_init`: "normal" (MONAI's learnable default: truncated normal, std `position_init_std` = 0.02) or
    "sincos" (the table starts as MONAI's fixed sin-cos embedding but stays learnable). Training from scratch
    on little data needs strong position identity from the first step: sin-cos, or a larger std."""

    def __init__(
        self,
        image_size: Sequence[int],
        patch_size: Sequence[int],
        in_channels: int,
        features: int,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        position_init: str = "normal",
        position_init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.image_size = tuple(image_size)
        self.patch_size = tuple(patch_size)
        self.in_channels = in_channels
        self.dtype = dtype
        for size, patch in zip(self.image_size, self.patch_size, strict=True):
            if size % patch:
                raise ValueError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        self.grid = tuple(s // p for s, p in zip(self.image_size, self.patch_size))
        num_patches = math.prod(self.grid)
        patch_dim = math.prod(self.patch_size) * in_channels
        self.projection = Dense(
            patch_dim, features, axes=("patch", "embed"), dtype=dtype, param_dtype=param_dtype,
            precision=precision, rngs=rngs,
        )
        if position_init == "normal":
            init = truncated_normal(position_init_std)
        elif position_init == "sincos":
            init = lambda key, shape, dtype: sincos_position_table(self.grid, features).astype(dtype)  # noqa: E731
        else:
            raise ValueError(f"position_init must be 'normal' or 'sincos', got {position_init!r}")
        self.position_embeddings = param(rngs, init, (num_patches, features), param_dtype, ("tokens", "embed"))

    def __call__(self, images: jax.Array) -> jax.Array:
        expected = (self.in_channels, *self.image_size)
        if images.ndim != 5 or images.shape[1:] != expected:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}], got {images.shape}")
        p1, p2, p3 = self.patch_size
        patches = rearrange(images, "b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)", p1=p1, p2=p2, p3=p3)
        return self.projection(patches) + self.position_embeddings[...].astype(self.dtype)
