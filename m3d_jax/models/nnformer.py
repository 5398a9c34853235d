"""nnFormer: the 3D Swin-style encoder–decoder that Med3DInsight pretrains (research note §1, §4, §6).

  volume [B, 1, 128³] → conv stem (4× down) → 4 stages of window-attention blocks (96 → 768 channels,
  32³ → 4³), each stage's output normed into a skip; PatchMerging between stages
  decoder: 3 stages from the 4³ neck back to 32³: upsample + skip → skip-attention block → Swin block
  heads: `res` (reconstruction, 1 channel) and `final` (segmentation logits), both 4× transposed convs

Layout: everything inside runs channels-last. `encode` returns the skips as [B, D_i, H_i, W_i, C_i]; the
last one is the bottleneck ("neck", [B, 4, 4, 4, 768] at the default size), and
`flatten_tokens(neck)` gives its [B, 64, 768] tokens in (s, h, w) row-major order — the same order as the
reference's `neck.flatten(2).transpose(1, 2)`. The decoder output is [B, 32, 32, 32, 96] (the
reference's `out[-1]`). Volumes in and volumes out (`reconstruct`, `segment`) are channels-first
[B, C, D, H, W], as M3D stores them.

Reference behaviour kept (research note §6):
- quirk 12: `relative_index="reference"` builds the relative-position index with the reference's
  multipliers (3w−1, 2w−1), so different offsets share a table row (115 of 343 rows used at w=4, 547 of
  3375 at w=8); "corrected" gives every 3D offset its own row.
- quirk 13: the decoder's first block of each stage takes K, V from the skip and uses the normed upsampled
  features as Q with no projection; PatchMerging applies GELU before its LayerNorm; the skip-attention
  residual starts from upsampled + skip.
- when a stage's smallest side is ≤ its window, the window shrinks to that side and there is no shift
  (stage 2: 8³ with window 8, one global window; stage 3: 4³).

Parameter names follow the torch keys (`model_down.patch_embed.proj1.conv1`, `model_down.layers.{i}.blocks.
{j}.attn.relative_position_bias_table`, `decoder.layers.{i}.blocks.0.attn.kv`, `res`, `final`) except:
torch `weight` → `kernel` (linear, conv) or `scale` (LayerNorm), `mlp.fc1/fc2` → `mlp.linear1/linear2`
(the shared Mlp), `decoder.layers.{i}.Upsample` → `upsample`, `res.up` → `res`, `final.0.up` → `final`.
Kernels: Conv3d (k, k, k, I, O) [torch (O, I, k, k, k)]; ConvTranspose3d (k, k, k, I, O) [torch
(I, O, k, k, k)]; qkv (C, 3, heads, head_dim) and kv (C, 2, heads, head_dim) [torch (3C, C), (2C, C)];
proj (heads, head_dim, C). The reference's `relative_position_index` buffers are recomputed here
(`relative_position_index`), not stored.

DropPath: stochastic depth 0 → `drop_path_rate` linearly over the encoder's blocks, and separately over
the decoder's (as the reference). It is active only when `rngs` (stream "dropout") is passed; `rngs=None`
is the deterministic (evaluation) mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from m3d_jax.config import Precision, dataclass_from_mapping
from m3d_jax.layers import Dense, LayerNorm, Mlp, RematPolicy, activation, param
from m3d_jax.layers.conv import Conv3d, ConvTranspose3d, torch_default_init
from m3d_jax.layers.params import DType, truncated_normal

RelativeIndexMode = Literal["reference", "corrected"]

# Attention logits between tokens from different roll regions of a shifted window get this added
# (the reference's value: finite, so every row keeps a defined softmax).
SHIFT_MASK_VALUE = -100.0

# torch's default Conv/Linear init (kaiming_uniform with a=√5): U(±1/√fan_in).

_REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# --- configuration ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NnFormerConfig(Precision):
    """nnFormer hyper-parameters; defaults are Med3DInsight's pretraining setup (`task_pretrain.py`).

    Decoder stage k (k = 0 … num_stages − 2; run deepest first) works at encoder stage k's width and
    resolution with `num_heads[k + 1]` heads, window `window_sizes[k]` and `depths[k]` blocks — the
    reference builds it from the reversed encoder lists. With the defaults: 96/192/384 channels at
    32³/16³/8³, heads 6/12/24, windows 4/4/8.

    The stem is two stride-2 convolutions, so `patch_size` must be 4 on every axis (the reference's
    stride patch//2 per conv only reaches the patch size there).
    """

    crop_size: tuple[int, int, int] = (128, 128, 128)
    in_channels: int = 1
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    patch_size: tuple[int, int, int] = (4, 4, 4)
    window_sizes: tuple[int, ...] = (4, 4, 8, 4)
    num_classes: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2  # encoder and decoder, each 0 → rate over its blocks
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    relative_index: RelativeIndexMode = "reference"  # quirk 12; "corrected": one table row per 3D offset
    reconstruction_head: bool = True  # `res`: ConvTranspose3d(embed → in_channels, patch, patch)
    segmentation_head: bool = True  # `final`: ConvTranspose3d(embed → num_classes, patch, patch)
    remat: RematPolicy = "none"  # rematerialise each transformer block in the backward pass

    def __post_init__(self):
        super().__post_init__()
        for name in ("crop_size", "patch_size", "depths", "num_heads", "window_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.crop_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"crop_size {self.crop_size} and patch_size {self.patch_size} need 3 entries")
        if self.patch_size != (4, 4, 4):
            raise ValueError(f"the two stride-2 stem convolutions need patch_size (4, 4, 4), got {self.patch_size}")
        stages = len(self.depths)
        if stages < 2 or len(self.num_heads) != stages or len(self.window_sizes) != stages:
            raise ValueError(
                f"depths {self.depths}, num_heads {self.num_heads} and window_sizes {self.window_sizes} need one "
                "entry per stage (at least 2 stages)"
            )
        if self.embed_dim % 2:
            raise ValueError(f"embed_dim {self.embed_dim} must be even (the stem's first conv has embed_dim/2)")
        step = 4 * 2 ** (stages - 1)
        if any(size % step for size in self.crop_size):
            raise ValueError(f"crop_size {self.crop_size} must be divisible by {step} (patch 4 × 2^(stages−1))")
        for stage, (dim, heads) in enumerate(zip(self.stage_dims, self.num_heads)):
            if dim % heads:
                raise ValueError(f"stage {stage}: width {dim} is not divisible by {heads} heads")
        for stage in range(stages - 1):  # decoder stage k: width of encoder stage k, heads of stage k + 1
            if self.stage_dims[stage] % self.num_heads[stage + 1]:
                raise ValueError(
                    f"decoder stage {stage}: width {self.stage_dims[stage]} not divisible by "
                    f"{self.num_heads[stage + 1]} heads"
                )
        for stage, resolution in enumerate(self.stage_resolutions):
            window, _ = effective_window(resolution, self.window_sizes[stage])
            if any(side % window for side in resolution):
                raise ValueError(
                    f"stage {stage}: resolution {resolution} is not divisible by its window {window} "
                    "(the reference would pad; this implementation needs whole windows)"
                )
        if self.relative_index not in ("reference", "corrected"):
            raise ValueError(f"relative_index must be 'reference' or 'corrected', got {self.relative_index!r}")
        if self.remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of none, {', '.join(_REMAT_POLICIES)}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**stage for stage in range(self.num_stages))

    @property
    def stage_resolutions(self) -> tuple[tuple[int, int, int], ...]:
        """(D, H, W) token grid of each stage: crop / 4 / 2^stage."""
        return tuple(
            tuple(size // 4 // 2**stage for size in self.crop_size) for stage in range(self.num_stages)
        )

    @property
    def decoder_num_heads(self) -> tuple[int, ...]:
        return self.num_heads[1:]

    @property
    def decoder_window_sizes(self) -> tuple[int, ...]:
        return self.window_sizes[:-1]

    def encoder_drop_path(self, stage: int) -> tuple[float, ...]:
        """Per-block stochastic-depth rates of encoder stage `stage` (linear over all encoder blocks)."""
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        start = sum(self.depths[:stage])
        return tuple(float(r) for r in rates[start:start + self.depths[stage]])

    def decoder_drop_path(self, stage: int) -> tuple[float, ...]:
        """Per-block rates of decoder stage `stage`. The reference spreads 0 → rate over its decoder stages
        listed deepest first, so the first-run (deepest) stage gets the smallest rates."""
        depths = self.depths[:-1][::-1]  # deepest first
        order = self.num_stages - 2 - stage
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
        start = sum(depths[:order])
        return tuple(float(r) for r in rates[start:start + depths[order]])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NnFormerConfig:
        return dataclass_from_mapping(cls, values)


# --- window helpers (pure functions, tested directly) -------------------------------------------------


def effective_window(resolution: Sequence[int], window: int) -> tuple[int, bool]:
    """(window, may_shift): a window at least as large as the smallest side shrinks to that side and is
    never shifted (the reference's rule)."""
    smallest = min(resolution)
    if smallest <= window:
        return smallest, False
    return window, True


def relative_position_index(window: int, mode: RelativeIndexMode = "reference") -> np.ndarray:
    """[w³, w³] int32: the bias-table row for each (query token, key token) pair of a window whose tokens
    are in (s, h, w) row-major order.

    With offsets d = query − key + (w − 1) ∈ [0, 2w − 2] per axis,
      reference: d_s·(3w − 1) + d_h·(2w − 1) + d_w   (nnFormer's multipliers; offsets collide)
      corrected: d_s·(2w − 1)² + d_h·(2w − 1) + d_w  (one row per offset, all (2w − 1)³ rows)
    """
    coords = np.stack(np.meshgrid(*[np.arange(window)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = coords[:, None, :] - coords[None, :, :] + (window - 1)  # [T, T, 3]
    span = 2 * window - 1
    if mode == "reference":
        strides = np.array([3 * window - 1, 2 * window - 1, 1])
    elif mode == "corrected":
        strides = np.array([span * span, span, 1])
    else:
        raise ValueError(f"relative index mode must be 'reference' or 'corrected', got {mode!r}")
    return (offsets * strides).sum(-1).astype(np.int32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """[B, S, H, W, C] → [B · nW, w³, C]: windows ordered (batch, s, h, w) block-major, tokens inside a
    window in (s, h, w) row-major order (the reference's order, so masks line up)."""
    return rearrange(x, "b (s p) (h q) (w r) c -> (b s h w) (p q r) c", p=window, q=window, r=window)


def window_reverse(windows: jax.Array, window: int, resolution: Sequence[int]) -> jax.Array:
    """Inverse of `window_partition`: [B · nW, w³, C] → [B, S, H, W, C]."""
    s, h, w = (side // window for side in resolution)
    return rearrange(
        windows, "(b s h w) (p q r) c -> b (s p) (h q) (w r) c", s=s, h=h, w=w, p=window, q=window, r=window
    )


def shift_regions(resolution: Sequence[int], window: int, shift: int) -> np.ndarray:
    """[S, H, W] int: which of the 27 roll regions each position of the *rolled* grid belongs to. Along each
    axis: [0, n − w) is region 0, [n − w, n − shift) region 1, [n − shift, n) region 2."""
    labels = []
    for side in resolution:
        axis = np.zeros(side, np.int32)
        axis[side - window:side - shift] = 1
        axis[side - shift:] = 2
        labels.append(axis)
    return labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]


def shifted_window_mask(resolution: Sequence[int], window: int, shift: int) -> np.ndarray:
    """[nW, w³, w³] float32 additive mask of the shifted windows: 0 between tokens of the same roll region,
    −100 between tokens that the cyclic roll brought together from different regions."""
    regions = window_partition(shift_regions(resolution, window, shift)[None, ..., None], window)[..., 0]  # [nW, T]
    different = regions[:, :, None] != regions[:, None, :]
    return np.where(different, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def flatten_tokens(features: jax.Array) -> jax.Array:
    """[B, D, H, W, C] → [B, D·H·W, C], tokens in (s, h, w) row-major order."""
    return features.reshape(features.shape[0], -1, features.shape[-1])


def drop_path(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Stochastic depth: zero whole samples with probability `rate`, scale the rest by 1/(1 − rate);
    the identity without `rngs` (evaluation)."""
    if rngs is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# --- stem, merging, upsampling -----------------------------------------------------------------------


class StemProjection(nnx.Module):
    """conv1 (stride) → GELU → norm1 → conv2 (stride 1) [→ GELU → norm2 unless `last`]; norms on channels."""

    def __init__(self, in_features: int, out_features: int, *, stride: int, last: bool, eps: float,
                 rngs: nnx.Rngs, **dtypes):
        self.conv1 = Conv3d(in_features, out_features, kernel=3, stride=stride, padding=1, rngs=rngs, **dtypes)
        self.norm1 = LayerNorm(out_features, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.conv2 = Conv3d(out_features, out_features, kernel=3, stride=1, padding=1, rngs=rngs, **dtypes)
        self.norm2 = None if last else LayerNorm(out_features, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.act = activation("gelu")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv2(self.norm1(self.act(self.conv1(x))))
        return x if self.norm2 is None else self.norm2(self.act(x))


class PatchEmbed(nnx.Module):
    """The 4× conv stem: proj1 (in → C/2, stride 2), proj2 (C/2 → C, stride 2, ends on the bare conv), norm."""

    def __init__(self, config: NnFormerConfig, *, rngs: nnx.Rngs, **dtypes):
        eps, dim = config.layer_norm_eps, config.embed_dim
        self.proj1 = StemProjection(config.in_channels, dim // 2, stride=2, last=False, eps=eps, rngs=rngs, **dtypes)
        self.proj2 = StemProjection(dim // 2, dim, stride=2, last=True, eps=eps, rngs=rngs, **dtypes)
        self.norm = LayerNorm(dim, eps=eps, axes=("embed",), rngs=rngs, **dtypes)

    def __call__(self, volumes: jax.Array) -> jax.Array:  # [B, D, H, W, in] → [B, D/4, H/4, W/4, C]
        return self.norm(self.proj2(self.proj1(volumes)))


class PatchMerging(nnx.Module):
    """GELU → LayerNorm(C) → Conv3d(C → 2C, k3, s2, p1) (GELU before the norm: quirk 13)."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, **dtypes):
        self.norm = LayerNorm(features, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.reduction = Conv3d(features, 2 * features, kernel=3, stride=2, padding=1, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.reduction(self.norm(activation("gelu")(x)))


class PatchExpanding(nnx.Module):
    """LayerNorm(2C) → ConvTranspose3d(2C → C, k2, s2)."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, **dtypes):
        self.norm = LayerNorm(features, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.up = ConvTranspose3d(features, features // 2, kernel=2, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.norm(x))


# --- window attention and blocks ---------------------------------------------------------------------


class WindowAttention(nnx.Module):
    """Multi-head attention inside windows of w³ tokens with a learned relative-position bias
    (table of (2w − 1)³ rows × heads, indexed by `relative_position_index`).

    Self-attention (`qkv`) by default. With `skip_attention`, keys and values come from `kv(context)` and
    the queries are the inputs themselves split into heads, with no projection (the reference's decoder).
    """

    def __init__(self, features: int, num_heads: int, window: int, *, relative_index: RelativeIndexMode,
                 qkv_bias: bool, skip_attention: bool = False, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.head_dim = num_heads, features // num_heads
        self.window, self.relative_index = window, relative_index
        heads = (num_heads, self.head_dim)
        common = dict(use_bias=qkv_bias, kernel_init=torch_default_init, rngs=rngs, **dtypes)
        axes = ("embed", None, "heads", "head_dim")
        self.qkv = None if skip_attention else Dense(features, (3, *heads), axes=axes, **common)
        self.kv = Dense(features, (2, *heads), axes=axes, **common) if skip_attention else None
        self.proj = Dense(heads, features, axes=("heads", "head_dim", "embed"), kernel_init=torch_default_init,
                          rngs=rngs, **dtypes)
        self.relative_position_bias_table = param(
            rngs, truncated_normal(0.02), ((2 * window - 1) ** 3, num_heads), param_dtype,
            ("relative_position", "heads"),
        )

    def position_bias(self) -> jax.Array:
        """[heads, w³, w³] additive bias from the table."""
        index = relative_position_index(self.window, self.relative_index)
        return jnp.moveaxis(self.relative_position_bias_table[...][index], -1, 0)

    def __call__(self, windows: jax.Array, context: jax.Array | None = None,
                 mask: np.ndarray | None = None) -> jax.Array:
        """windows (and context) [B · nW, w³, C]; mask [nW, w³, w³] additive or None → [B · nW, w³, C]."""
        if self.qkv is not None:
            qkv = self.qkv(windows)  # [Bw, T, 3, N, H]
            query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            kv = self.kv(context)
            key, value = kv[:, :, 0], kv[:, :, 1]
            query = windows.reshape(*windows.shape[:2], self.num_heads, self.head_dim).astype(key.dtype)
        bias = self.position_bias()[None]  # [1, N, T, T]
        if mask is not None:
            num_windows, tokens = mask.shape[0], mask.shape[-1]
            bias = bias[None] + jnp.asarray(mask)[None, :, None]  # [1, nW, N, T, T]
            batch = windows.shape[0] // num_windows
            bias = jnp.broadcast_to(bias, (batch, *bias.shape[1:])).reshape(-1, self.num_heads, tokens, tokens)
        # The bias (positions plus the −100 roll mask) is additive, so this calls the JAX attention directly
        # rather than `attend` (boolean masks only).
        context_out = jax.nn.dot_product_attention(
            query, key, value, bias=bias.astype(query.dtype), scale=self.head_dim**-0.5
        )
        return self.proj(context_out)


def _in_windows(attention: Callable[..., jax.Array], inputs: Sequence[jax.Array], window: int, shift: int,
                mask: np.ndarray | None) -> jax.Array:
    """Rolls the [B, S, H, W, C] inputs by −shift, cuts windows, applies `attention(*windows, mask=…)`,
    reassembles and rolls back."""
    resolution = inputs[0].shape[1:4]
    if shift:
        inputs = [jnp.roll(x, (-shift,) * 3, axis=(1, 2, 3)) for x in inputs]
    out = attention(*[window_partition(x, window) for x in inputs], mask=mask)
    out = window_reverse(out, window, resolution)
    return jnp.roll(out, (shift,) * 3, axis=(1, 2, 3)) if shift else out


class SwinBlock(nnx.Module):
    """Pre-norm block: x + DropPath(W-MSA / SW-MSA(norm1(x))); x + DropPath(MLP(norm2(x))).

    With `skip_attention` (the decoder's first block of a stage) it is called as block(x_up, skip): norm1 is
    applied to both, K and V come from the skip, Q is the normed x_up, and the residual is x_up + skip.
    """

    def __init__(self, features: int, num_heads: int, resolution: Sequence[int], window: int, shift: bool,
                 drop_path_rate: float, config: NnFormerConfig, *, skip_attention: bool = False, rngs: nnx.Rngs,
                 **dtypes):
        self.window, may_shift = effective_window(resolution, window)
        self.shift = self.window // 2 if (shift and may_shift) else 0
        self.resolution = tuple(resolution)
        self.drop_path_rate = drop_path_rate
        eps = config.layer_norm_eps
        self.norm1 = LayerNorm(features, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.attn = WindowAttention(features, num_heads, self.window, relative_index=config.relative_index,
                                    qkv_bias=config.qkv_bias, skip_attention=skip_attention, rngs=rngs, **dtypes)
        self.norm2 = LayerNorm(features, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.mlp = Mlp(features, int(features * config.mlp_ratio), act="gelu", rngs=rngs, **dtypes)

    @property
    def mask(self) -> np.ndarray | None:
        return shifted_window_mask(self.resolution, self.window, self.shift) if self.shift else None

    def attention(self, *normed: jax.Array) -> jax.Array:
        """The (shifted-)window attention of the normed [B, S, H, W, C] input(s), before the residual."""
        return _in_windows(self.attn, normed, self.window, self.shift, self.mask)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        if tuple(x.shape[1:4]) != self.resolution:
            raise ValueError(f"block built for resolution {self.resolution}, got features of shape {x.shape}")
        if skip is None:
            attended = self.attention(self.norm1(x))
        else:  # the attention's call order is (queries, context): Q from x_up, K and V from the skip
            attended = self.attention(self.norm1(x), self.norm1(skip))
            x = x + skip
        x = x + drop_path(attended, self.drop_path_rate, rngs)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, rngs)


def _run_block(block: SwinBlock, remat: RematPolicy, x: jax.Array, skip: jax.Array | None,
               rngs: nnx.Rngs | None) -> jax.Array:
    if remat == "none":
        return block(x, skip, rngs)
    apply = nnx.remat(lambda b, x, s, r: b(x, s, r), policy=_REMAT_POLICIES[remat])
    return apply(block, x, skip, rngs)


# --- encoder, decoder, model -------------------------------------------------------------------------


class EncoderStage(nnx.Module):
    """`depth` blocks alternating unshifted / shifted windows, then PatchMerging (all but the last stage)."""

    def __init__(self, config: NnFormerConfig, stage: int, *, rngs: nnx.Rngs, **dtypes):
        dim, resolution = config.stage_dims[stage], config.stage_resolutions[stage]
        rates = config.encoder_drop_path(stage)
        self.blocks = nnx.List([
            SwinBlock(dim, config.num_heads[stage], resolution, config.window_sizes[stage], index % 2 == 1,
                      rates[index], config, rngs=rngs, **dtypes)
            for index in range(config.depths[stage])
        ])
        last = stage == config.num_stages - 1
        self.downsample = None if last else PatchMerging(dim, eps=config.layer_norm_eps, rngs=rngs, **dtypes)


class Encoder(nnx.Module):
    """Stem and stages; stage i's output, normed by `norm{i}`, is skip i; the un-normed output is merged."""

    def __init__(self, config: NnFormerConfig, *, rngs: nnx.Rngs, **dtypes):
        self.config = config
        self.patch_embed = PatchEmbed(config, rngs=rngs, **dtypes)
        self.layers = nnx.List([EncoderStage(config, stage, rngs=rngs, **dtypes) for stage in range(config.num_stages)])
        for stage, dim in enumerate(config.stage_dims):
            setattr(self, f"norm{stage}", LayerNorm(dim, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs,
                                                    **dtypes))

    def __call__(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        x = self.patch_embed(volumes)  # [B, D/4, H/4, W/4, C]
        skips = []
        for stage, layer in enumerate(self.layers):
            for block in layer.blocks:
                x = _run_block(block, self.config.remat, x, None, rngs)
            skips.append(getattr(self, f"norm{stage}")(x))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return skips


class DecoderStage(nnx.Module):
    """upsample(x) = x_up; block 0 = skip attention(x_up, skip); blocks 1… = Swin blocks with shifted windows."""

    def __init__(self, config: NnFormerConfig, stage: int, *, rngs: nnx.Rngs, **dtypes):
        dim, resolution = config.stage_dims[stage], config.stage_resolutions[stage]
        heads, window = config.decoder_num_heads[stage], config.decoder_window_sizes[stage]
        rates = config.decoder_drop_path(stage)
        self.upsample = PatchExpanding(2 * dim, eps=config.layer_norm_eps, rngs=rngs, **dtypes)
        self.blocks = nnx.List([
            SwinBlock(dim, heads, resolution, window, index > 0, rates[index], config, skip_attention=index == 0,
                      rngs=rngs, **dtypes)
            for index in range(config.depths[stage])
        ])


class Decoder(nnx.Module):
    """Runs the stages deepest first: stage k turns [B, ·, 2C] features into stage k's [B, D_k, H_k, W_k, C]."""

    def __init__(self, config: NnFormerConfig, *, rngs: nnx.Rngs, **dtypes):
        self.config = config
        self.layers = nnx.List([DecoderStage(config, stage, rngs=rngs, **dtypes)
                                for stage in range(config.num_stages - 1)])

    def __call__(self, skips: Sequence[jax.Array], rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        """skips as `Encoder` returns them (the last is the neck) → every stage's output, deepest first."""
        x, outputs = skips[-1], []
        for stage in reversed(range(len(self.layers))):
            layer = self.layers[stage]
            x_up = layer.upsample(x)
            x = _run_block(layer.blocks[0], self.config.remat, x_up, skips[stage], rngs)
            for block in layer.blocks[1:]:
                x = _run_block(block, self.config.remat, x, None, rngs)
            outputs.append(x)
        return outputs


class NnFormerOutput(NamedTuple):
    neck: jax.Array  # [B, 4, 4, 4, 768] bottleneck (normed last skip), channels-last
    decoded: jax.Array  # [B, 32, 32, 32, 96] last decoder stage, channels-last
    reconstruction: jax.Array | None  # [B, in_channels, D, H, W] (`res`, no activation)
    segmentation: jax.Array | None  # [B, num_classes, D, H, W] logits (`final`)


class NnFormer(nnx.Module):
    """nnFormer with Med3DInsight's heads. Call with volumes [B, in_channels, D, H, W] (channels first)."""

    def __init__(self, config: NnFormerConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.dtypes()
        self.model_down = Encoder(config, rngs=rngs, **dtypes)
        self.decoder = Decoder(config, rngs=rngs, **dtypes)
        head = dict(kernel=4, rngs=rngs, **dtypes)
        self.res = ConvTranspose3d(config.embed_dim, config.in_channels, **head) if config.reconstruction_head else None
        self.final = ConvTranspose3d(config.embed_dim, config.num_classes, **head) if config.segmentation_head else None

    def encode(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        """volumes [B, in, D, H, W] → skips [B, D_i, H_i, W_i, C_i] (channels-last), the last one the neck."""
        expected = (self.config.in_channels, *self.config.crop_size)
        if volumes.ndim != 5 or tuple(volumes.shape[1:]) != expected:
            raise ValueError(f"expected volumes of shape [B, {', '.join(map(str, expected))}], got {volumes.shape}")
        return self.model_down(jnp.moveaxis(volumes, 1, -1), rngs)

    def decode(self, skips: Sequence[jax.Array], rngs: nnx.Rngs | None = None) -> jax.Array:
        """skips from `encode` → the last decoder stage's output [B, D/4, H/4, W/4, embed_dim]."""
        return self.decoder(skips, rngs)[-1]

    def _head(self, head: ConvTranspose3d | None, name: str, decoded: jax.Array) -> jax.Array:
        if head is None:
            raise ValueError(f"this NnFormer was built with {name}=False")
        return jnp.moveaxis(head(decoded), -1, 1)

    def reconstruct(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The reconstruction [B, in_channels, D, H, W] (pretraining's MSE target is the input)."""
        return self._head(self.res, "reconstruction_head", self.decode(self.encode(volumes, rngs), rngs))

    def segment(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Segmentation logits [B, num_classes, D, H, W]."""
        return self._head(self.final, "segmentation_head", self.decode(self.encode(volumes, rngs), rngs))

    def __call__(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> NnFormerOutput:
        skips = self.encode(volumes, rngs)
        decoded = self.decode(skips, rngs)
        return NnFormerOutput(
            neck=skips[-1],
            decoded=decoded,
            reconstruction=None if self.res is None else self._head(self.res, "reconstruction_head", decoded),
            segmentation=None if self.final is None else self._head(self.final, "segmentation_head", decoded),
        )
