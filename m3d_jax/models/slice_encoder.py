"""SigLIP's vision transformer, Med-2E3's 2D slice encoder (google/siglip-large-patch16-256).

images [N, C, H, W] → non-overlapping patches · kernel + bias (HF's Conv2d with kernel = stride = patch) +
learned position table → pre-norm layers x + attn(layer_norm1(x)); x + mlp(layer_norm2(x)) → post_layernorm
→ (optional) attention-pooling head: one learned probe query attends to the tokens, then
pooled + mlp(layernorm(pooled)).

Med-2E3 encodes every depth slice of a [B, 1, 32, 256, 256] volume as its own image (the channel repeated to 3,
raw [0, 1] values, no SigLIP processor) and takes the last layer's output BEFORE post_layernorm, all 256
tokens: `encode_slices` with the default config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from m3d_jax.config import ComputeOptions, dataclass_from_mapping
from m3d_jax.layers import Dense, LayerNorm, Mlp, run_stack, stacked
from m3d_jax.layers.attention import AttentionImpl, attend
from m3d_jax.layers.mlp import activation
from m3d_jax.layers.params import normal, param
from m3d_jax.sharding import RESIDUAL, constrain

# transformers' SiglipVisionConfig defaults: a saved config.json leaves out the fields that equal them.
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True)
_HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(ComputeOptions):
    """SigLIP vision hyper-parameters (defaults: google/siglip-large-patch16-256); `from_hf` / `to_hf` map a
    transformers config.

    select_layer: which encoder layer's output is `features`, indexed like the list of layer outputs:
      -1 the last (HF `hidden_states[-1]`), -2 the one before; a non-negative k is layer k (0-based),
      i.e. HF `hidden_states[k + 1]` (HF's tuple starts with the embeddings).
    select_post_norm: apply post_layernorm to the selected output. Med-2E3: (-1, False), the last layer's
      output before the norm; (-1, True) is HF's `last_hidden_state`.
    use_head: build the attention-pooling head (HF `vision_use_head`, on in SiglipVisionModel checkpoints).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_tanh"
    use_head: bool = True
    select_layer: int = -1
    select_post_norm: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if not -self.num_layers <= self.select_layer < self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} outside the {self.num_layers} layers")
        activation(self.hidden_act)  # an unknown name fails here, listing the valid ones

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SiglipVisionConfig:
        """From a mapping of this class's fields (e.g. a ConfigDict), naming unknown keys."""
        return dataclass_from_mapping(cls, values)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> SiglipVisionConfig:
        """From a transformers `SiglipVisionConfig` dict, or a full `SiglipConfig` dict (its `vision_config`).
        Missing fields take transformers' defaults, as `from_pretrained` would."""
        if "vision_config" in hf:
            hf = hf["vision_config"] or {}
        hf = {**HF_DEFAULTS, **hf}
        act = hf["hidden_act"]
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"unsupported SigLIP hidden_act {act!r}; supported: {sorted(_HF_ACTIVATIONS)}")
        fields = dict(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], image_size=hf["image_size"],
            patch_size=hf["patch_size"], in_channels=hf["num_channels"], layer_norm_eps=hf["layer_norm_eps"],
            hidden_act=_HF_ACTIVATIONS[act], use_head=bool(hf["vision_use_head"]),
        )
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict for `SiglipVisionModel`."""
        return dict(
            model_type="siglip_vision_model", architectures=["SiglipVisionModel"], hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_channels=self.in_channels, image_size=self.image_size,
            patch_size=self.patch_size, layer_norm_eps=self.layer_norm_eps,
            hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(self.hidden_act, self.hidden_act),
            vision_use_head=self.use_head, attention_dropout=0.0,
        )


class SiglipVisionOutput(NamedTuple):
    features: jax.Array  # [N, num_patches, hidden]: the selected layer's output (post-norm if select_post_norm)
    # [N, num_patches, hidden], post_layernorm of the last layer (HF last_hidden_state); None when the
    # selected layer is not the last and hidden states were not asked for (later layers are not run)
    last_hidden_state: jax.Array | None
    pooled: jax.Array | None  # [N, hidden]: the attention-pooling head's output (HF pooler_output)
    hidden_states: tuple[jax.Array, ...] | None  # embeddings output, then every layer's output (pre-norm)


class SiglipEmbeddings(nnx.Module):
    """Patch projection (a Dense over (patch, patch, channel) = HF's stride-patch Conv2d) + position table."""

    def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, **dtypes):
        self.config = config
        self.dtype = dtypes["dtype"]
        patch = config.patch_size
        self.patch_embedding = Dense((patch, patch, config.in_channels), config.hidden_size,
                                     axes=("patch", "patch", "patch", "embed"), rngs=rngs, **dtypes)
        self.position_embedding = param(rngs, normal(config.hidden_size**-0.5),
                                        (config.num_patches, config.hidden_size), dtypes["param_dtype"],
                                        ("tokens", "embed"))

    def __call__(self, images: jax.Array) -> jax.Array:
        config = self.config
        expected = (config.in_channels, config.image_size, config.image_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected images of shape [N, {', '.join(map(str, expected))}] (channels first), "
                             f"got {images.shape}")
        # Tokens run row-major over the patch grid, as HF flattens its conv output.
        patches = rearrange(images, "n c (h ph) (w pw) -> n (h w) ph pw c", ph=config.patch_size, pw=config.patch_size)
        return self.patch_embedding(patches) + self.position_embedding[...].astype(self.dtype)


class SiglipAttention(nnx.Module):
    """Multi-head attention with separate, biased q/k/v projections; scale head_dim^-0.5. Used as the encoder
    self-attention and as the pooling head's cross-attention (torch MultiheadAttention: same computation,
    its packed in_proj is split by the converter)."""

    def __init__(self, config: SiglipVisionConfig, *, implementation: AttentionImpl, rngs: nnx.Rngs, **dtypes):
        heads, head_dim, hidden = config.num_heads, config.head_dim, config.hidden_size
        self.scale = head_dim**-0.5
        self.implementation = implementation
        projection = lambda: Dense(hidden, (heads, head_dim), axes=("embed", "heads", "head_dim"),  # noqa: E731
                                   rngs=rngs, **dtypes)
        self.q_proj, self.k_proj, self.v_proj = projection(), projection(), projection()
        self.out_proj = Dense((heads, head_dim), hidden, axes=("heads", "head_dim", "embed"), rngs=rngs, **dtypes)

    def __call__(self, queries: jax.Array, tokens: jax.Array) -> jax.Array:
        """queries [N, Tq, hidden] attend to tokens [N, T, hidden] → [N, Tq, hidden]."""
        context = attend(self.q_proj(queries), self.k_proj(tokens), self.v_proj(tokens), scale=self.scale,
                         implementation=self.implementation)
        return self.out_proj(context)


class SiglipEncoderLayer(nnx.Module):
    """Pre-norm layer: x + attn(layer_norm1(x)); x + mlp(layer_norm2(x))."""

    def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, **dtypes):
        norm = lambda: LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",),  # noqa: E731
                                 rngs=rngs, **dtypes)
        self.layer_norm1 = norm()
        self.self_attn = SiglipAttention(config, implementation=config.attention_impl, rngs=rngs, **dtypes)
        self.layer_norm2 = norm()
        self.mlp = Mlp(config.hidden_size, config.intermediate_size, act=config.hidden_act, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = self.layer_norm1(x)
        x = constrain(x + self.self_attn(normed, normed), RESIDUAL)
        return constrain(x + self.mlp(self.layer_norm2(x)), RESIDUAL)


class SiglipPoolingHead(nnx.Module):
    """Multi-head attention pooling: a learned probe query attends to the tokens, then a residual MLP."""

    def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, **dtypes):
        self.dtype = dtypes["dtype"]
        self.probe = param(rngs, normal(1.0), (config.hidden_size,), dtypes["param_dtype"], ("embed",))
        # One query: a fused kernel buys nothing, and XLA's path takes any length.
        self.attention = SiglipAttention(config, implementation="xla", rngs=rngs, **dtypes)
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs,
                                   **dtypes)
        self.mlp = Mlp(config.hidden_size, config.intermediate_size, act=config.hidden_act, rngs=rngs, **dtypes)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [N, T, hidden] → [N, hidden]."""
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        pooled = self.attention(probe, tokens)  # [N, 1, hidden]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVision(nnx.Module):
    """SigLIP's vision tower (HF `SiglipVisionModel`). Call with images [N, C, H, W], channels first like HF."""

    def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.dtypes()
        self.embeddings = SiglipEmbeddings(config, rngs=rngs, **dtypes)
        self.layers = stacked(lambda layer_rngs: SiglipEncoderLayer(config, rngs=layer_rngs, **dtypes),
                              config.num_layers, rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs,
                                        **dtypes)
        self.head = SiglipPoolingHead(config, rngs=rngs, **dtypes) if config.use_head else None

    def __call__(self, images: jax.Array, *, output_hidden_states: bool = False) -> SiglipVisionOutput:
        config = self.config
        x = self.embeddings(images)  # [N, num_patches, hidden]
        selected = config.select_layer % config.num_layers
        run_all = output_hidden_states or selected == config.num_layers - 1
        last, layer_outputs, _ = run_stack(
            self.layers, x, num_layers=config.num_layers if run_all else selected + 1, scan=config.scan_layers,
            remat=config.remat, collect=output_hidden_states,
        )
        features = layer_outputs[selected] if output_hidden_states else last
        last_hidden_state = self.post_layernorm(last) if run_all else None
        if config.select_post_norm:
            features = last_hidden_state if selected == config.num_layers - 1 else self.post_layernorm(features)
        pooled = self.head(last_hidden_state) if self.head is not None and run_all else None
        states = (x, *layer_outputs) if output_hidden_states else None
        return SiglipVisionOutput(features, last_hidden_state, pooled, states)


def encode_slices(model: SiglipVision, volume: jax.Array) -> jax.Array:
    """Med-2E3's 2D branch: every depth slice of volumes [B, 1, D, H, W] (values in [0, 1], used as they are:
    no mean/std normalisation, as the reference) encoded as one image, the single channel repeated to
    `in_channels`; all B·D slices form one batch. Returns the selected features [B, D, num_patches, hidden]."""
    config = model.config
    if volume.ndim != 5 or volume.shape[1] != 1 or volume.shape[3:] != (config.image_size, config.image_size):
        raise ValueError(f"expected volumes of shape [B, 1, D, {config.image_size}, {config.image_size}], "
                         f"got {volume.shape}")
    batch, _, depth, height, width = volume.shape
    slices = rearrange(volume, "b c d h w -> (b d) c h w")
    # B·D slices, batch-sharded: without this the compiler replicated the whole SigLIP pass (Med-2E3 stage 2
    # needed ~385 GiB of temporaries per chip on any v5e slice)
    slices = constrain(jnp.broadcast_to(slices, (batch * depth, config.in_channels, height, width)),
                       ("batch", None, None, None))
    features = model(slices).features  # [B·D, num_patches, hidden]
    return features.reshape(batch, depth, *features.shape[1:])
