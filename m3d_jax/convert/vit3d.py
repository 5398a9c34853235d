"""Key maps for the 3D ViT in its three released places.

- `m3d_clip_vision`: M3D-CLIP's standalone vision weights (`pretrained_ViT.bin`), keys at the root.
- `lamed_vision_tower`: the tower inside an M3D-LaMed checkpoint (`model.vision_tower.vision_tower.`).
- `segvol_image_encoder`: SegVol's encoder inside LaMed (`model.seg_module.image_encoder.`), no cls token.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from m3d_jax.convert.keymap import IDENTITY, LINEAR, ConversionReport, KeyMap, Linear, Reshape, Rule, load_model
from m3d_jax.convert.kind import Kind, Part, Source
from m3d_jax.convert.torch_io import CheckpointReadError
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


def _recognise(source: Source) -> ViT3DConfig | None:
    """A folder written by jax2torch (config.json with a `vit3d` entry), or a bare MONAI / M3D-CLIP
    vision checkpoint without config.json (`pretrained_ViT.bin`), its sizes read from the shapes."""
    if source.hf is not None:
        return KIND.parse(source.hf, source.path / "config.json") if "vit3d" in source.hf else None
    keys = set(source.reader.keys())
    if "patch_embedding.patch_embeddings.1.weight" not in keys:
        return None
    pos = source.reader.info("patch_embedding.position_embeddings").shape
    depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    config = ViT3DConfig(hidden_size=pos[-1], num_layers=depth, cls_token="cls_token" in keys,
                         mlp_dim=source.reader.info("blocks.0.mlp.linear1.weight").shape[0],
                         num_heads=max(1, pos[-1] // 64))
    if config.num_patches != pos[1]:
        raise CheckpointReadError(f"{source.path}: a bare ViT checkpoint with {pos[1]} patches does not match the "
                                  "default image/patch size; write a config.json with the sizes")
    return config


KIND = Kind(
    "vit3d", "3D ViT", ViT3D, lambda hf: ViT3DConfig.from_dict(hf["vit3d"]),
    lambda config: {"vit3d": dataclasses.asdict(config)}, _recognise,
    released="a ViT state dict without config.json (pretrained_ViT.bin)",
    parts=(Part("", "", lambda config: vit3d_keymap(config, "m3d_clip_vision")),),
)
