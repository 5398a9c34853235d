"""Key maps for the 3D ViT in its three released places.

- `m3d_clip_vision`: M3D-CLIP's standalone vision weights (`pretrained_ViT.bin`), keys at the root.
- `lamed_vision_tower`: the tower inside an M3D-LaMed checkpoint (`model.vision_tower.vision_tower.`).
- `segvol_image_encoder`: SegVol's encoder inside LaMed (`model.seg_module.image_encoder.`), no cls token.
"""

from __future__ import annotations

import os

from flax import nnx

from m3d_jax.convert.keymap import IDENTITY, LINEAR, ConversionReport, KeyMap, Linear, Reshape, Rule, load_model
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

VIT3D_PREFIXES = {
    "m3d_clip_vision": "",
    "lamed_vision_tower": "model.vision_tower.vision_tower.",
    "segvol_image_encoder": "model.seg_module.image_encoder.",
}

# Present in MONAI's ViT state dicts but not part of the M3D encoder.
MONAI_EXTRAS = (
    ("blocks.{layer}.norm_cross_attn.*", "MONAI >=1.4 cross-attention norm, unused without cross-attention"),
    ("blocks.{layer}.cross_attn.*", "MONAI 1.4.0 cross-attention block, unused without cross-attention"),
    ("classification_head.*", "MONAI classification head; M3D's ViT has none"),
)


def vit3d_keymap(config: ViT3DConfig, layout: str = "m3d_clip_vision") -> KeyMap:
    """The torch ↔ JAX map of a ViT3D with this config in one of `VIT3D_PREFIXES`' layouts."""
    if layout not in VIT3D_PREFIXES:
        raise ValueError(f"unknown ViT3D layout {layout!r}; choose one of {sorted(VIT3D_PREFIXES)}")
    rules = [
        Rule("patch_embedding.position_embeddings", "patch_embedding.position_embeddings", Reshape(leading_ones=1)),
        Rule("patch_embedding.patch_embeddings.1.weight", "patch_embedding.projection.kernel", LINEAR),
        Rule("patch_embedding.patch_embeddings.1.bias", "patch_embedding.projection.bias"),
        Rule("blocks.{layer}.norm1.weight", "blocks.norm1.scale"),
        Rule("blocks.{layer}.norm1.bias", "blocks.norm1.bias"),
        Rule("blocks.{layer}.attn.qkv.weight", "blocks.attn.qkv.kernel", LINEAR),
        Rule("blocks.{layer}.attn.out_proj.weight", "blocks.attn.out_proj.kernel", Linear(n_in=2)),
        Rule("blocks.{layer}.attn.out_proj.bias", "blocks.attn.out_proj.bias"),
        Rule("blocks.{layer}.norm2.weight", "blocks.norm2.scale"),
        Rule("blocks.{layer}.norm2.bias", "blocks.norm2.bias"),
        Rule("blocks.{layer}.mlp.linear1.weight", "blocks.mlp.linear1.kernel", LINEAR),
        Rule("blocks.{layer}.mlp.linear1.bias", "blocks.mlp.linear1.bias"),
        Rule("blocks.{layer}.mlp.linear2.weight", "blocks.mlp.linear2.kernel", LINEAR),
        Rule("blocks.{layer}.mlp.linear2.bias", "blocks.mlp.linear2.bias"),
        Rule("norm.weight", "norm.scale"),
        Rule("norm.bias", "norm.bias", IDENTITY),
    ]
    if config.qkv_bias:
        rules.append(Rule("blocks.{layer}.attn.qkv.bias", "blocks.attn.qkv.bias", Reshape(flatten=True)))
    if config.cls_token:
        rules.append(Rule("cls_token", "cls_token", Reshape(leading_ones=2)))
    return KeyMap(f"vit3d/{layout}", tuple(rules), prefix=VIT3D_PREFIXES[layout], ignored=MONAI_EXTRAS)


def load_vit3d(
    path: str | os.PathLike, config: ViT3DConfig, layout: str = "m3d_clip_vision"
) -> tuple[ViT3D, ConversionReport]:
    """Loads a ViT3D from a PyTorch checkpoint (file or folder) in the given layout."""
    return load_model(path, vit3d_keymap(config, layout), lambda: ViT3D(config, rngs=nnx.Rngs(0)))
