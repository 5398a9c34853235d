"""Med3DInsight pretraining: a 3D backbone (nnFormer, or UNETR as the second choice) whose bottleneck tokens,
read by the plane-slice-aware transformer for one 2D slice, should agree with what a frozen 2D model says
about that slice.

  volume [B, 1, 128³] → nnFormer → neck [B, 4, 4, 4, 768] → 64 tokens (s, h, w row-major)
                                  → reconstruction [B, 1, 128³]
  (UNETR: the ViT's 512 normed tokens [B, 512, 768]; reconstruction = a 1×1×1 conv `res` on its decoder's
  [B, 128³, 16] features; its `out` segmentation head is, like nnFormer's `final`, not trained here)
  PSAT(tokens, plane, slice) → slice-aware volume embedding [B, 512]
  loss = OT(embedding, slice image embedding) + OT(embedding, slice text embedding) + MSE(reconstruction, volume)

OT is the entropic partial Wasserstein alignment (`m3d_jax.losses.partial_ot`) with the learnable metric `L`
[512, 512] (only its diagonal enters the cost by default, as the reference). The 2D embeddings are inputs
(precomputed by the frozen 2D encoder) and get no gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from m3d_jax.config import dataclass_from_mapping
from m3d_jax.layers import Dense, param
from m3d_jax.losses.partial_ot import alignment_plan, partial_ot_alignment_loss
from m3d_jax.models.nnformer import NnFormer, NnFormerConfig
from m3d_jax.models.psat import Psat, PsatConfig
from m3d_jax.models.unetr import Unetr, UnetrConfig

BACKBONES = {"nnformer": NnFormerConfig, "unetr": UnetrConfig}


@dataclasses.dataclass(frozen=True)
class Med3DInsightConfig:
    backbone: NnFormerConfig | UnetrConfig = NnFormerConfig()
    backbone_kind: str = "nnformer"  # or "unetr"
    psat: PsatConfig = PsatConfig()
    ot_reg: float = 0.03
    ot_mass: float = 0.95
    ot_iterations: int = 1000
    full_metric: bool = False  # False: diag(L) only (reference); True: M = L·Lᵀ, a proper Mahalanobis metric

    def __post_init__(self):
        if self.backbone_kind not in BACKBONES or not isinstance(self.backbone, BACKBONES[self.backbone_kind]):
            raise ValueError(f"backbone_kind {self.backbone_kind!r} needs one of {sorted(BACKBONES)} and its "
                             f"config, got a {type(self.backbone).__name__}")
        if self.psat.hidden_size != self.bottleneck_width:
            raise ValueError(f"PSAT width {self.psat.hidden_size} must equal the bottleneck width "
                             f"{self.bottleneck_width}")

    @property
    def bottleneck_width(self) -> int:
        backbone = self.backbone
        return backbone.stage_dims[-1] if isinstance(backbone, NnFormerConfig) else backbone.vit.hidden_size

    @property
    def crop_size(self) -> tuple[int, int, int]:
        backbone = self.backbone
        return backbone.crop_size if isinstance(backbone, NnFormerConfig) else backbone.vit.image_size

    @property
    def in_channels(self) -> int:
        backbone = self.backbone
        return backbone.in_channels if isinstance(backbone, NnFormerConfig) else backbone.vit.in_channels

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Med3DInsightConfig:
        values = dict(values)
        kind = values.get("backbone_kind", "nnformer")
        if kind not in BACKBONES:
            raise ValueError(f"unknown backbone_kind {kind!r}; choose one of {sorted(BACKBONES)}")
        values["backbone"] = BACKBONES[kind].from_dict(values.get("backbone", {}))
        values["psat"] = PsatConfig(**values.get("psat", {}))
        return dataclass_from_mapping(cls, values)


def _metric_init(key, shape, dtype):
    """0.5 (A + Aᵀ) + I with A ~ U[0, 1): the reference's symmetric start, diagonal in [1, 2)."""
    a = jax.random.uniform(key, shape, dtype)
    return 0.5 * (a + a.T) + jnp.eye(shape[0], dtype=dtype)


class Med3DInsightOutput(NamedTuple):
    embedding: jax.Array  # [B, out_dim]: PSAT query 0, projected
    reconstruction: jax.Array  # [B, 1, D, H, W]


class Med3DInsight(nnx.Module):
    def __init__(self, config: Med3DInsightConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.backbone_kind == "unetr":
            self.backbone = Unetr(config.backbone, rngs=rngs)
            self.res = Dense(config.backbone.feature_size, config.in_channels, axes=(None, None), rngs=rngs)
        else:
            self.backbone = NnFormer(config.backbone, rngs=rngs)
            self.res = None  # nnFormer has its own `res` head
        self.psat = Psat(config.psat, rngs=rngs)
        self.L = param(rngs, _metric_init, (config.psat.out_dim,) * 2, jnp.float32, (None, None))

    def __call__(self, volumes: jax.Array, plane: jax.Array, slice_index: jax.Array,
                 rngs: nnx.Rngs | None = None) -> Med3DInsightOutput:
        if self.res is not None:  # UNETR
            tokens, hidden_states = self.backbone.encode(volumes, rngs)  # [B, 512, 768]
            features = self.backbone.decode(volumes, tokens, hidden_states)  # [B, D, H, W, feature_size]
            reconstruction = jnp.moveaxis(self.res(features), -1, 1)
        else:
            out = self.backbone(volumes, rngs)
            tokens = rearrange(out.neck, "b d h w c -> b (d h w) c")  # [B, 64, 768]
            reconstruction = out.reconstruction
        return Med3DInsightOutput(self.psat(tokens, plane, slice_index, rngs), reconstruction)


def _ot_options(config: Med3DInsightConfig) -> dict[str, Any]:
    return dict(reg=config.ot_reg, m=config.ot_mass, num_iter_max=config.ot_iterations, full=config.full_metric)


def med3dinsight_loss(model: Med3DInsight, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """OT(3D, slice image) + OT(3D, slice text) + MSE reconstruction. Returns (loss, metrics)."""
    out = model(batch["images"], batch["plane"], batch["slice_index"], rngs)
    metric = model.L[...]
    ot = _ot_options(model.config)
    image_ot = partial_ot_alignment_loss(out.embedding, jax.lax.stop_gradient(batch["image_embedding"]), metric, **ot)
    text_ot = partial_ot_alignment_loss(out.embedding, jax.lax.stop_gradient(batch["text_embedding"]), metric, **ot)
    reconstruction = jnp.mean(jnp.square(out.reconstruction.astype(jnp.float32) - batch["images"]))
    loss = image_ot + text_ot + reconstruction
    return loss, {"loss": loss, "ot_image": image_ot, "ot_text": text_ot, "reconstruction_mse": reconstruction}


def plan_diagonal_mass(model: Med3DInsight, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The mass the OT plans put on the true (volume, slice) pairs — trace(π) of 3D ↔ slice image and 3D ↔
    slice text, out of `ot_mass` (chance: ot_mass / B) — in evaluation mode."""
    out = model(batch["images"], batch["plane"], batch["slice_index"])
    ot = _ot_options(model.config)
    return {side: jnp.trace(alignment_plan(out.embedding, batch[f"{side}_embedding"], model.L[...], **ot))
            for side in ("image", "text")}
