"""M3D's spatial-pooling projector ("spp"): 3D ViT patch features → pooled → MLP into the LLM width.

[B, N, C] patch tokens on the (d, h, w) patch grid → average pool (kernel = stride = pooling_size) in 3D
("spatial") or over runs of pooling_size³ consecutive tokens ("sequence") → [B, proj_out_num, C] →
Linear (→ GELU → Linear)* ("mlp") or Linear* ("linear") → [B, proj_out_num, H].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from m3d_jax.layers import Dense
from m3d_jax.layers.params import canonical_dtype


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    grid: tuple[int, int, int] = (8, 16, 16)  # the vision tower's patch grid (image_size / patch_size)
    in_dim: int = 768
    out_dim: int = 3072
    layer_type: str = "mlp"  # mlp | linear
    layer_num: int = 2
    pooling_type: str = "spatial"  # spatial | sequence
    pooling_size: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))
        if self.layer_type not in ("mlp", "linear") or self.pooling_type not in ("spatial", "sequence"):
            raise ValueError(f"unsupported projector {self.layer_type}/{self.pooling_type}")
        if any(g % self.pooling_size for g in self.grid):
            raise ValueError(f"patch grid {self.grid} is not divisible by pooling_size {self.pooling_size}")

    @property
    def proj_out_num(self) -> int:
        """Image tokens after pooling (256 for the released 32×256×256 / 4×16×16 / 2 setting)."""
        return math.prod(g // self.pooling_size for g in self.grid)


class SpatialPoolingProjector(nnx.Module):
    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = dict(dtype=canonical_dtype(config.dtype), param_dtype=canonical_dtype(config.param_dtype))
        widths = [config.in_dim] + [config.out_dim] * config.layer_num
        self.layers = nnx.List([
            Dense(fan_in, fan_out, axes=("vision_embed" if i == 0 else "mlp", "mlp" if i + 1 < config.layer_num
                                          else "embed"), rngs=rngs, **dtypes)
            for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]))
        ])

    def pool(self, features: jax.Array) -> jax.Array:
        """[B, N, C] → [B, proj_out_num, C] by average pooling."""
        config, size = self.config, self.config.pooling_size
        if features.shape[1] != math.prod(config.grid):
            raise ValueError(f"expected {math.prod(config.grid)} patch tokens for grid {config.grid}, "
                             f"got {features.shape[1]}")
        if config.pooling_type == "sequence":
            return features.reshape(features.shape[0], -1, size**3, features.shape[-1]).mean(axis=2)
        d, h, w = (g // size for g in config.grid)
        blocks = rearrange(features, "b (d i h j w k) c -> b (d h w) (i j k) c", d=d, h=h, w=w, i=size, j=size, k=size)
        return blocks.mean(axis=2)

    def __call__(self, features: jax.Array) -> jax.Array:
        x = self.pool(features.astype(jnp.float32)).astype(canonical_dtype(self.config.dtype))
        for index, layer in enumerate(self.layers):
            if index > 0 and self.config.layer_type == "mlp":
                x = jax.nn.gelu(x, approximate=False)
            x = layer(x)
        return x
