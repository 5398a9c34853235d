"""M3D-CLIP: the 3D ViT (cls token) and BERT ([CLS] of the last hidden state), each projected and
L2-normalised, trained with a symmetric contrastive loss over the global batch.

The loss is written on global arrays: under `jit` with the batch sharded over the data axes, the
[B, B] logits span every device's samples (XLA gathers the features, and gradients flow back through
the gather), which is the reference's gather-with-gradients form without explicit collectives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m3d_jax.config import dataclass_from_mapping
from m3d_jax.layers import Dense, param
from m3d_jax.layers.params import canonical_dtype
from m3d_jax.models.text_encoder import Bert, BertConfig
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

LOGIT_SCALE_INIT = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """logit_scale: "reference" multiplies the similarities by the learnable scalar itself (M3D-CLIP);
    "standard" by exp(scalar) with the scalar clamped at ln(logit_scale_max) (OpenAI CLIP).
    language_model_name_or_path: where the reference builds its BERT from (`BertModel.from_pretrained`);
    kept from the source config and written back, so the reference rebuilds the same BERT from an export."""

    vision: ViT3DConfig = ViT3DConfig(select_feature="cls_patch")
    text: BertConfig = BertConfig()
    embed_dim: int = 768
    max_text_len: int = 128
    logit_scale: Literal["reference", "standard"] = "reference"
    logit_scale_max: float = 100.0
    language_model_name_or_path: str = "bert-base-uncased"

    def __post_init__(self):
        if not (self.vision.cls_token and self.vision.select_feature == "cls_patch"):
            raise ValueError("M3D-CLIP reads the ViT's cls token: vision needs cls_token=True and "
                             "select_feature='cls_patch'")
        if self.logit_scale not in ("reference", "standard"):
            raise ValueError(f"logit_scale must be 'reference' or 'standard', got {self.logit_scale!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClipConfig:
        """From a mapping of this class's fields, with `vision` and `text` as mappings of theirs."""
        values = dict(values)
        vision = ViT3DConfig.from_dict({"select_feature": "cls_patch", **values.pop("vision", {})})
        text = BertConfig.from_dict(values.pop("text", {}))
        return dataclass_from_mapping(cls, {**values, "vision": vision, "text": text})

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ClipConfig:
        """From a released M3D-CLIP `config.json` (model_type m3d_clip). Its BERT is bert-base-uncased (the
        file names only the path it was loaded from) unless a `text_config` entry (written by `to_hf`, or by
        m3d_jax.convert.clip.clip_hf_with_shapes from a checkpoint's shapes) says otherwise."""
        if hf.get("pos_embed", "perceptron") != "perceptron":
            raise ValueError(f"M3D-CLIP config: pos_embed {hf['pos_embed']!r}; only 'perceptron' is supported")
        vision = ViT3DConfig(
            image_size=tuple(hf.get("img_size", (32, 256, 256))), patch_size=tuple(hf.get("patch_size", (4, 16, 16))),
            in_channels=hf.get("in_channels", 1), hidden_size=hf.get("hidden_size", 768),
            mlp_dim=hf.get("mlp_dim", 3072), num_layers=hf.get("num_layers", 12), num_heads=hf.get("num_heads", 12),
            select_feature="cls_patch",
        )
        text = (BertConfig.from_hf(hf["text_config"]) if "text_config" in hf
                else BertConfig(vocab_size=hf.get("vocab_size", 30522)))
        return cls(vision=vision, text=text, embed_dim=hf.get("embed_dim", vision.hidden_size),
                   max_text_len=hf.get("max_text_len", 128),
                   language_model_name_or_path=hf.get("language_model_name_or_path") or "bert-base-uncased")

    def to_hf(self) -> dict[str, Any]:
        """A released-layout `config.json` dict (plus `text_config` and `embed_dim`, which the reference
        derives from `language_model_name_or_path` and the ViT width)."""
        v = self.vision
        return dict(
            model_type="m3d_clip", architectures=["M3DCLIP"],
            language_model_name_or_path=self.language_model_name_or_path,
            local_loss=False, gather_loss=True, in_channels=v.in_channels, img_size=list(v.image_size),
            patch_size=list(v.patch_size), hidden_size=v.hidden_size, mlp_dim=v.mlp_dim, num_layers=v.num_layers,
            num_heads=v.num_heads, pos_embed="perceptron", dropout_rate=0.0, spatial_dims=3,
            max_text_len=self.max_text_len, vocab_size=self.text.vocab_size, embed_dim=self.embed_dim,
            text_config=self.text.to_hf(), torch_dtype="float32",
        )


class ClipOutput(NamedTuple):
    image_features: jax.Array  # [B, embed_dim], unit norm
    text_features: jax.Array  # [B, embed_dim], unit norm
    scale: jax.Array  # the factor the similarities are multiplied by


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class M3DClip(nnx.Module):
    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = canonical_dtype(config.vision.param_dtype)
        self.vision_encoder = ViT3D(config.vision, rngs=rngs)
        self.language_encoder = Bert(config.text, rngs=rngs)
        self.mm_vision_proj = Dense(config.vision.hidden_size, config.embed_dim, axes=("embed", "mlp2"),
                                    param_dtype=param_dtype, rngs=rngs)
        self.mm_language_proj = Dense(config.text.hidden_size, config.embed_dim, axes=("embed", "mlp2"),
                                      param_dtype=param_dtype, rngs=rngs)
        init = lambda key, shape, dtype: jnp.full(shape, LOGIT_SCALE_INIT, dtype)  # noqa: E731
        self.logit_scale = param(rngs, init, (), jnp.float32, ())

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [B, C, D, H, W] → unit image embeddings [B, embed_dim]."""
        cls = self.vision_encoder(images).features[:, 0]
        return _normalize(self.mm_vision_proj(cls))

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids, attention_mask [B, L] → unit text embeddings [B, embed_dim] (from [CLS])."""
        cls = self.language_encoder(input_ids, attention_mask).last_hidden_state[:, 0]
        return _normalize(self.mm_language_proj(cls))

    def scale(self) -> jax.Array:
        value = self.logit_scale[...]
        if self.config.logit_scale == "standard":
            return jnp.exp(jnp.minimum(value, math.log(self.config.logit_scale_max)))
        return value

    def __call__(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> ClipOutput:
        return ClipOutput(self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale())


def contrastive_loss(image_features: jax.Array, text_features: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric cross-entropy over the [B, B] scaled similarities with pair i ↔ i as the target."""
    logits = scale * image_features @ text_features.T  # [B_images, B_texts]
    labels = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (image_to_text + text_to_image) / 2


def clip_loss(model: M3DClip, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """(loss, metrics) of a batch with images [B,C,D,H,W], input_ids and attention_mask [B,L]."""
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    loss = contrastive_loss(out.image_features, out.text_features, out.scale)
    similarity = out.image_features @ out.text_features.T
    accuracy = (jnp.argmax(similarity, axis=1) == jnp.arange(similarity.shape[0])).mean()
    return loss, {"loss": loss, "clip_loss": loss, "logit_scale": out.scale, "batch_i2t_accuracy": accuracy}
