"""UNETR (Hatamizadeh et al. 2022) on the 3D ViT: Med3DInsight's second backbone choice (the first is nnFormer).

  volume [B, C, D, H, W] → ViT3D (no cls token, 16³ patches) → tokens [B, N, hidden] (final LayerNorm) and
  hidden_states (each block's output, not normed); a token sequence is reshaped to the patch grid
  [B, D/16, H/16, W/16, hidden] ("proj_feat").
  skips: encoder1(volume) [B, D, H, W, f]; encoder2/3/4(hidden_states[3 / 6 / 9]) at D/2, D/4, D/8 with
  2f / 4f / 8f channels (a 2× transposed conv from the grid, then 2 / 1 / 0 further up-steps).
  decoder5(tokens grid, enc4) → D/8, 8f; decoder4 → D/4, 4f; decoder3 → D/2, 2f; decoder2 → D, f
  (each: 2× transposed conv, concatenate the skip, conv block); `out`: 1×1×1 conv → out_channels logits.

MONAI-identical (`monai.networks.nets.UNETR`, MONAI 1.6.1, `proj_type="perceptron"`, or "conv" through the key
map; `norm_name="instance"`; dropout 0): the ViT, the block order and every shape. Conv blocks are MONAI's
UnetResBlock (`res_block=True`: conv–norm–LeakyReLU–conv–norm, plus a 1×1×1 conv–norm shortcut when the
channel count changes, summed, then LeakyReLU) or UnetBasicBlock (two conv–norm–LeakyReLU). All convolutions
and transposed convolutions are bias-free except `out`; 3³ convs pad 1; transposed convs are k = stride = 2.
InstanceNorm is MONAI's "instance": per sample and channel over D, H, W, biased variance, eps 1e-5, no affine
parameters, no running statistics. LeakyReLU slope 0.01. Weights load with `m3d_jax.convert.unetr`.

Layout: channels-last inside; volumes in and logits out are channels-first, as M3D stores them. Parameter
paths follow MONAI's module names without its `Convolution` wrapper (`encoder1.layer.conv1.kernel` ↔
`encoder1.layer.conv1.conv.weight`); a PrUp block's up-steps are `blocks.{i}.up` (torch `blocks.{i}.0`)
and `blocks.{i}.block` (torch `blocks.{i}.1`). Kernels are (k, k, k, I, O) for both convolution kinds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.config import dataclass_from_mapping
from m3d_jax.layers.conv import Conv3d, ConvTranspose3d
from m3d_jax.layers.params import canonical_dtype
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

# torch's default Conv init (kaiming_uniform with a=√5): U(±1/√fan_in).

# MONAI's UNETR: 16³ patches, four 2× up-steps back to the input size.
UNETR_PATCH = (16, 16, 16)
LEAKY_SLOPE = 0.01  # MONAI's UnetResBlock / UnetBasicBlock default act ("leakyrelu", negative_slope 0.01)
INSTANCE_NORM_EPS = 1e-5  # torch InstanceNorm3d default


# The ViT fields UNETR fixes or changes from ViT3DConfig's defaults. 128³ is Med3DInsight's crop (nnFormer's
# default) with 8³ = 512 tokens; MONAI's BTCV recipe uses 96³.
UNETR_VIT_DEFAULTS: dict[str, Any] = {"image_size": (128, 128, 128), "patch_size": UNETR_PATCH, "cls_token": False}


@dataclasses.dataclass(frozen=True)
class UnetrConfig:
    """UNETR hyper-parameters; defaults are MONAI UNETR's (ViT-B: hidden 768, mlp 3072, 12 layers, 12 heads,
    feature_size 16, instance norm, residual and conv blocks) at a 128³ crop.

    vit: the encoder. It must have no cls token, 16³ patches, and select the normed last block (its
      `select_layer=-1, select_final_norm=True` defaults): that is MONAI UNETR's `x`.
    out_channels: segmentation classes of the `out` head (2: background / foreground).
    norm: only "instance" (MONAI's default `norm_name`, InstanceNorm3d without affine parameters).
    res_block: UnetResBlock (True) or UnetBasicBlock (False) in encoder1 and every decoder, and in the
      up-steps of encoder2/3 when `conv_block`.
    conv_block: encoder2/3's extra up-steps are transposed conv + conv block (True) or a bare transposed conv.
    skip_layers: which `hidden_states` (0-based block index) feed encoder2, 3, 4. MONAI hard-codes
      `hidden_states_out[3 / 6 / 9]`, the outputs of blocks 4, 7, 10 counted from 1; the paper's z3, z6, z9
      read as 1-based block numbers would be (2, 5, 8).
    dtype, param_dtype: None takes the ViT's; a value is applied to the ViT as well (one dtype for the model).
    """

    vit: ViT3DConfig = dataclasses.field(default_factory=lambda: ViT3DConfig(**UNETR_VIT_DEFAULTS))
    feature_size: int = 16
    out_channels: int = 2
    norm: Literal["instance"] = "instance"
    res_block: bool = True
    conv_block: bool = True
    skip_layers: tuple[int, int, int] = (3, 6, 9)
    dtype: str | None = None
    param_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        vit = self.vit
        if self.dtype is not None and vit.dtype != self.dtype:
            vit = dataclasses.replace(vit, dtype=self.dtype)
        if self.param_dtype is not None and vit.param_dtype != self.param_dtype:
            vit = dataclasses.replace(vit, param_dtype=self.param_dtype)
        object.__setattr__(self, "vit", vit)
        object.__setattr__(self, "dtype", vit.dtype)
        object.__setattr__(self, "param_dtype", vit.param_dtype)
        if vit.cls_token:
            raise ValueError("UNETR reshapes the ViT's tokens to the patch grid: vit.cls_token must be False")
        if vit.patch_size != UNETR_PATCH:
            raise ValueError(f"UNETR's four 2× up-steps need vit.patch_size {UNETR_PATCH}, got {vit.patch_size}")
        if vit.select_layer % vit.num_layers != vit.num_layers - 1 or not vit.select_final_norm:
            raise ValueError(
                "UNETR decodes the final-normed last block: vit.select_layer must be -1 and "
                f"vit.select_final_norm True, got {vit.select_layer} and {vit.select_final_norm}"
            )
        if len(self.skip_layers) != 3 or min(self.skip_layers) < 0 or max(self.skip_layers) >= vit.num_layers:
            raise ValueError(
                f"skip_layers {self.skip_layers} must be 3 block indices in [0, {vit.num_layers}) "
                f"(vit.num_layers = {vit.num_layers})"
            )
        if self.norm != "instance":
            raise ValueError(f"only norm 'instance' (MONAI's default) is implemented, got {self.norm!r}")
        if self.feature_size < 1 or self.out_channels < 1:
            raise ValueError(f"feature_size {self.feature_size} and out_channels {self.out_channels} must be ≥ 1")

    @property
    def grid(self) -> tuple[int, int, int]:
        """The ViT's patch grid (D/16, H/16, W/16)."""
        return self.vit.grid

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UnetrConfig:
        """From a mapping of this class's fields, naming unknown keys. `vit` may be a mapping of ViT3DConfig
        fields: image_size, patch_size and cls_token default to UNETR's (128³, 16³, False), the rest to
        ViT3DConfig's (ViT-B)."""
        values = dict(values)
        if "vit" in values and not isinstance(values["vit"], ViT3DConfig):
            values["vit"] = ViT3DConfig.from_dict({**UNETR_VIT_DEFAULTS, **dict(values["vit"])})
        return dataclass_from_mapping(cls, values)


# --- layers ----------------------------------------------------------------------------------------


def instance_norm(x: jax.Array, eps: float = INSTANCE_NORM_EPS) -> jax.Array:
    """torch InstanceNorm3d (affine=False, no running stats) on [B, D, H, W, C]: per sample and channel over
    D, H, W with the biased variance; statistics in float32."""
    values = x.astype(jnp.float32)
    mean = jnp.mean(values, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(values - mean), axis=(1, 2, 3), keepdims=True)
    return ((values - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, LEAKY_SLOPE)


# --- MONAI's blocks --------------------------------------------------------------------------------


class ResBlock(nnx.Module):
    """MONAI UnetResBlock (stride 1): lrelu(norm2(conv2(lrelu(norm1(conv1(x))))) + shortcut), the shortcut
    norm3(conv3(x)) (1×1×1) when the channel count changes, else x."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, **dtypes):
        self.conv1 = Conv3d(in_features, out_features, kernel=3, use_bias=False, rngs=rngs, **dtypes)
        self.conv2 = Conv3d(out_features, out_features, kernel=3, use_bias=False, rngs=rngs, **dtypes)
        self.conv3 = (
            Conv3d(in_features, out_features, kernel=1, use_bias=False, rngs=rngs, **dtypes)
            if in_features != out_features else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = instance_norm(self.conv2(leaky_relu(instance_norm(self.conv1(x)))))
        shortcut = x if self.conv3 is None else instance_norm(self.conv3(x))
        return leaky_relu(out + shortcut)



class BasicBlock(nnx.Module):
    """MONAI UnetBasicBlock (stride 1): lrelu(norm2(conv2(lrelu(norm1(conv1(x))))))."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, **dtypes):
        self.conv1 = Conv3d(in_features, out_features, kernel=3, use_bias=False, rngs=rngs, **dtypes)
        self.conv2 = Conv3d(out_features, out_features, kernel=3, use_bias=False, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return leaky_relu(instance_norm(self.conv2(leaky_relu(instance_norm(self.conv1(x))))))


def _conv_block(res_block: bool, in_features: int, out_features: int, *, rngs: nnx.Rngs, **dtypes) -> nnx.Module:
    block = ResBlock if res_block else BasicBlock
    return block(in_features, out_features, rngs=rngs, **dtypes)


class BasicEncoder(nnx.Module):
    """MONAI UnetrBasicBlock (encoder1): one conv block on the full-resolution volume."""

    def __init__(self, in_features: int, out_features: int, *, res_block: bool, rngs: nnx.Rngs, **dtypes):
        self.layer = _conv_block(res_block, in_features, out_features, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


class UpStep(nnx.Module):
    """One of a PrUp block's extra up-steps: 2× transposed conv, then a conv block unless `block` is None."""

    def __init__(self, features: int, *, conv_block: bool, res_block: bool, rngs: nnx.Rngs, **dtypes):
        self.up = ConvTranspose3d(features, features, kernel=2, use_bias=False, rngs=rngs, **dtypes)
        self.block = _conv_block(res_block, features, features, rngs=rngs, **dtypes) if conv_block else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.up(x)
        return x if self.block is None else self.block(x)


class PrUpEncoder(nnx.Module):
    """MONAI UnetrPrUpBlock (encoder2/3/4): `transp_conv_init` (2×, hidden → out) then `num_steps` UpSteps."""

    def __init__(self, in_features: int, out_features: int, num_steps: int, *, conv_block: bool, res_block: bool,
                 rngs: nnx.Rngs, **dtypes):
        self.transp_conv_init = ConvTranspose3d(in_features, out_features, kernel=2, use_bias=False, rngs=rngs,
                                                **dtypes)
        self.blocks = nnx.List([
            UpStep(out_features, conv_block=conv_block, res_block=res_block, rngs=rngs, **dtypes)
            for _ in range(num_steps)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.transp_conv_init(x)
        for step in self.blocks:
            x = step(x)
        return x


class UpDecoder(nnx.Module):
    """MONAI UnetrUpBlock (decoder5…2): 2× transposed conv, concatenate the skip after it on channels, conv
    block (2·out → out)."""

    def __init__(self, in_features: int, out_features: int, *, res_block: bool, rngs: nnx.Rngs, **dtypes):
        self.transp_conv = ConvTranspose3d(in_features, out_features, kernel=2, use_bias=False, rngs=rngs, **dtypes)
        self.conv_block = _conv_block(res_block, 2 * out_features, out_features, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        return self.conv_block(jnp.concatenate([self.transp_conv(x), skip.astype(x.dtype)], axis=-1))


# --- model -------------------------------------------------------------------------------------------


class Unetr(nnx.Module):
    """UNETR. Call with volumes [B, in_channels, D, H, W] (channels first) → logits [B, out_channels, D, H, W].

    Deterministic: MONAI's UNETR has no stochastic layer at dropout 0, so `rngs` is accepted for the
    backbone interface (nnFormer's) and unused."""

    def __init__(self, config: UnetrConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = {"dtype": canonical_dtype(config.dtype), "param_dtype": canonical_dtype(config.param_dtype)}
        f, hidden, blocks = config.feature_size, config.vit.hidden_size, {"res_block": config.res_block}
        self.vit = ViT3D(config.vit, rngs=rngs)
        self.encoder1 = BasicEncoder(config.vit.in_channels, f, **blocks, rngs=rngs, **dtypes)
        up = {"conv_block": config.conv_block, **blocks}
        self.encoder2 = PrUpEncoder(hidden, 2 * f, 2, **up, rngs=rngs, **dtypes)
        self.encoder3 = PrUpEncoder(hidden, 4 * f, 1, **up, rngs=rngs, **dtypes)
        self.encoder4 = PrUpEncoder(hidden, 8 * f, 0, **up, rngs=rngs, **dtypes)
        self.decoder5 = UpDecoder(hidden, 8 * f, **blocks, rngs=rngs, **dtypes)
        self.decoder4 = UpDecoder(8 * f, 4 * f, **blocks, rngs=rngs, **dtypes)
        self.decoder3 = UpDecoder(4 * f, 2 * f, **blocks, rngs=rngs, **dtypes)
        self.decoder2 = UpDecoder(2 * f, f, **blocks, rngs=rngs, **dtypes)
        self.out = Conv3d(f, config.out_channels, kernel=1, use_bias=True, rngs=rngs, **dtypes)

    def _check(self, volumes: jax.Array) -> None:
        expected = (self.config.vit.in_channels, *self.config.vit.image_size)
        if volumes.ndim != 5 or tuple(volumes.shape[1:]) != expected:
            raise ValueError(f"expected volumes of shape [B, {', '.join(map(str, expected))}], got {volumes.shape}")

    def to_grid(self, tokens: jax.Array) -> jax.Array:
        """[B, N, hidden] → [B, D/16, H/16, W/16, hidden] (MONAI's `proj_feat`, channels-last)."""
        return tokens.reshape(tokens.shape[0], *self.config.grid, tokens.shape[-1])

    def encode(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """volumes [B, C, D, H, W] → (tokens [B, N, hidden], the ViT's final-normed output — MONAI UNETR's `x`;
        hidden_states: every block's [B, N, hidden] output, not normed)."""
        del rngs
        self._check(volumes)
        out = self.vit(volumes, output_hidden_states=True)
        return out.features, out.hidden_states

    def decode(self, volumes: jax.Array, tokens: jax.Array, hidden_states: Sequence[jax.Array]) -> jax.Array:
        """The decoder: volumes [B, C, D, H, W] (encoder1's input) and `encode`'s outputs → decoder2's features
        [B, D, H, W, feature_size] (channels-last, before `out`)."""
        self._check(volumes)
        first, second, third = (self.to_grid(hidden_states[layer]) for layer in self.config.skip_layers)
        enc1 = self.encoder1(jnp.moveaxis(volumes, 1, -1))
        enc2, enc3, enc4 = self.encoder2(first), self.encoder3(second), self.encoder4(third)
        x = self.decoder5(self.to_grid(tokens), enc4)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        return self.decoder2(x, enc1)

    def __call__(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Segmentation logits [B, out_channels, D, H, W] (MONAI UNETR's output)."""
        tokens, hidden_states = self.encode(volumes, rngs)
        return jnp.moveaxis(self.out(self.decode(volumes, tokens, hidden_states)), -1, 1)
