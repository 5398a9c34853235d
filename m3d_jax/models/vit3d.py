"""The M3D 3D ViT: M3D-CLIP's vision tower, LaMed's image encoder and (without cls token) SegVol's.

images [B, C, D, H, W] → perceptron patches + position table → (cls prepended, no position) →
pre-norm blocks x + attn(norm1(x)); x + mlp(norm2(x)) → final LayerNorm `norm`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.config import ComputeOptions, dataclass_from_mapping
from m3d_jax.layers import FusedSelfAttention, LayerNorm, Mlp, PerceptronPatchEmbed3D, run_stack, stacked
from m3d_jax.layers.params import param, zeros
from m3d_jax.sharding import RESIDUAL, constrain


@dataclasses.dataclass(frozen=True)
class ViT3DConfig(ComputeOptions):
    """Hyper-parameters of the 3D ViT. Token counts and the position table follow from image/patch size.

    select_layer: which block's output is the feature (-1 = the last block).
    select_final_norm: apply the final LayerNorm to it. M3D-LaMed: (-1, True), the normed output.
      Med-2E3: (-1, False), the last block before the norm. M3D's `vision_select_layer < -1` means
      hidden_states[k] without norm (its released code indexes with the wrong variable there; we use k).
    select_feature: "patch" drops the cls token when there is one, "cls_patch" keeps it.
    """

    image_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 1
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    qkv_bias: bool = False
    cls_token: bool = True
    select_layer: int = -1
    select_final_norm: bool = True
    select_feature: Literal["patch", "cls_patch"] = "patch"
    attention_query_chunk: int = -1  # -1 auto (query blocks of 256 on CPU for long sequences), 0 off, >0 size
    position_init: str = "normal"  # "normal" (MONAI/M3D) or "sincos" (MONAI's sin-cos table, learnable)
    position_init_std: float = 0.02  # the "normal" table's std (MONAI: 0.02)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if len(self.image_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"image_size {self.image_size} and patch_size {self.patch_size} must have 3 entries")
        if any(s % p for s, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if not -self.num_layers <= self.select_layer < self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} outside the {self.num_layers} blocks")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the encoder (patches plus cls)."""
        return self.num_patches + int(self.cls_token)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ViT3DConfig:
        """From a mapping of this class's fields (e.g. a ConfigDict), naming unknown keys."""
        return dataclass_from_mapping(cls, values)


class ViT3DOutput(NamedTuple):
    features: jax.Array  # [B, num_patches (+1 with cls_patch), hidden]
    hidden_states: tuple[jax.Array, ...] | None  # every block's output (before the final norm)


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, config: ViT3DConfig, *, rngs: nnx.Rngs):
        dtypes = config.dtypes()
        self.norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)
        self.attn = FusedSelfAttention(
            config.hidden_size, config.num_heads, qkv_bias=config.qkv_bias,
            implementation=config.attention_impl, query_chunk=config.attention_query_chunk, rngs=rngs, **dtypes,
        )
        self.norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)
        self.mlp = Mlp(config.hidden_size, config.mlp_dim, act="gelu", rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x + self.attn(self.norm1(x)), RESIDUAL)
        return constrain(x + self.mlp(self.norm2(x)), RESIDUAL)


class ViT3D(nnx.Module):
    """The 3D ViT encoder. Call with images [B, C, D, H, W] (channels first, as M3D stores volumes)."""

    def __init__(self, config: ViT3DConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.dtypes()
        self.patch_embedding = PerceptronPatchEmbed3D(
            config.image_size, config.patch_size, config.in_channels, config.hidden_size,
            position_init=config.position_init, position_init_std=config.position_init_std, rngs=rngs, **dtypes
        )
        self.cls_token = (
            param(rngs, zeros, (config.hidden_size,), dtypes["param_dtype"], ("embed",)) if config.cls_token else None
        )
        self.blocks = stacked(lambda layer_rngs: EncoderBlock(config, rngs=layer_rngs), config.num_layers, rngs)
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)

    def __call__(self, images: jax.Array, *, output_hidden_states: bool = False) -> ViT3DOutput:
        config = self.config
        x = self.patch_embedding(images)  # [B, num_patches, hidden]
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)  # the cls token carries no position embedding
        selected_block = config.select_layer % config.num_layers
        num_run = config.num_layers if output_hidden_states else selected_block + 1
        last, hidden_states, _ = run_stack(
            self.blocks, x, num_layers=num_run, scan=config.scan_layers, remat=config.remat,
            collect=output_hidden_states,
        )
        features = hidden_states[selected_block] if output_hidden_states else last
        if config.select_final_norm:
            features = self.norm(features)
        if config.select_feature == "patch" and config.cls_token:
            features = features[:, 1:]
        return ViT3DOutput(features, tuple(hidden_states) if output_hidden_states else None)
