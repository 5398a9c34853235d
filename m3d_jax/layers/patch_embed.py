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


class PerceptronPatchEmbed3D(nnx.Module):
    """MONAI's "perceptron" patch embedding: cut [B, C, D, H, W] into non-overlapping patches, flatten
    each as (p1 p2 p3 c), project linearly, add a learnable position table. Tokens run depth-slowest."""

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
        self.position_embeddings = param(
            rngs, truncated_normal(0.02), (num_patches, features), param_dtype, ("tokens", "embed")
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        expected = (self.in_channels, *self.image_size)
        if images.ndim != 5 or images.shape[1:] != expected:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}], got {images.shape}")
        p1, p2, p3 = self.patch_size
        patches = rearrange(images, "b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)", p1=p1, p2=p2, p3=p3)
        return self.projection(patches) + self.position_embeddings[...].astype(self.dtype)
