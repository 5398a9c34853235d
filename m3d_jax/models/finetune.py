"""Downstream models on a pretrained Med3DInsight backbone (nnFormer):

  segmentation:   volume → nnFormer encoder–decoder → `final` (4× transposed conv) → logits [B, K, D, H, W]
  classification: volume → nnFormer encoder → bottleneck [B, 4, 4, 4, 768] → mean over its 64 tokens →
                  Linear → logits [B, K]
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from m3d_jax.layers import Dense
from m3d_jax.models.nnformer import NnFormer, NnFormerConfig


class VolumeSegmenter(nnx.Module):
    """nnFormer with its segmentation head `final` (`num_classes` from the config), no reconstruction head."""

    def __init__(self, config: NnFormerConfig, *, rngs: nnx.Rngs):
        self.config = dataclasses.replace(config, reconstruction_head=False, segmentation_head=True)
        self.backbone = NnFormer(self.config, rngs=rngs)

    def __call__(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.backbone.segment(volumes, rngs)


class VolumeClassifier(nnx.Module):
    """nnFormer encoder, the bottleneck averaged over its tokens, and a linear head to `num_classes`."""

    def __init__(self, config: NnFormerConfig, num_classes: int, *, rngs: nnx.Rngs):
        self.config = dataclasses.replace(config, reconstruction_head=False, segmentation_head=False)
        self.num_classes = num_classes
        self.backbone = NnFormer(self.config, rngs=rngs)
        self.head = Dense(self.config.stage_dims[-1], num_classes, axes=("embed", None), rngs=rngs)

    def __call__(self, volumes: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        neck = self.backbone.encode(volumes, rngs)[-1]  # [B, d, h, w, C]
        return self.head(neck.mean(axis=(1, 2, 3)))
