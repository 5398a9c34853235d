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

from m3d_jax.config import Precision
from m3d_jax.layers import Dense
from m3d_jax.layers.params import canonical_dtype


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(Precision):
    grid: tuple[int, int, int] = (8, 16, 16)  # the vision tower's patch grid (image_size / patch_size)
    in_dim: int = 768
    out_dim: int = 3072
    layer_type: str = "mlp"  # mlp | linear
    layer_num: int = 2
    pooling_type: str = "spatial"  # spatial | sequence
    pooling_size: int = 2

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "grid", tuple(self.grid))
        if self.layer_type not in ("mlp", "linear") or self.pooling_type not in ("spatial", "sequence"):
            raise ValueError(f"unsupported projector {self.layer_type}/{self.pooling_type}")
        if any(g % self.pooling_size for g in self.grid):
            raise ValueError(f"patch grid {self.grid} is not divisible by pooling_size {self.pooling_size}")

    @property
    def proj_out_num(self) -> int:
        """Image tokens after pooling (256 for the released 32×256×256 / 4×16×16 / 2 setting)."""
        return math.prod(g // self.pooling_size for g in self.grid)


def mlp_layers(in_dim: int, out_dim: int, num_layers: int, *, rngs: nnx.Rngs, **dtypes) -> nnx.List:
    """The Linears of a vision → LLM projection: in_dim → out_dim, then out_dim → out_dim (the reference's
    Sequential(Linear, GELU, Linear, ...) holds them at indices 0, 2, ...)."""
    widths = [in_dim] + [out_dim] * num_layers
    return nnx.List([
        Dense(fan_in, fan_out, axes=("vision_embed" if i == 0 else "mlp", "mlp" if i + 1 < num_layers else "embed"),
              rngs=rngs, **dtypes)
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]))
    ])


def run_mlp(layers: nnx.List, x: jax.Array, *, gelu: bool = True) -> jax.Array:
    """`mlp_layers` applied in turn, with an exact GELU between them when `gelu` (else all linear)."""
    for index, layer in enumerate(layers):
        x = layer(jax.nn.gelu(x, approximate=False) if gelu and index else x)
    return x


class SpatialPoolingProjector(nnx.Module):
    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.layers = mlp_layers(config.in_dim, config.out_dim, config.layer_num, rngs=rngs, **config.dtypes())

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
        return run_mlp(self.layers, x, gelu=self.config.layer_type == "mlp")
