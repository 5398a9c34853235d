"""Released M3D-CLIP checkpoints (`model_type` m3d_clip) ↔ JAX: `vision_encoder.*` (the 3D ViT with its
cls token), `language_encoder.*` (a BertModel), `mm_vision_proj`, `mm_language_proj`, `logit_scale`.

A released `config.json` records the ViT but not the BERT: the reference builds it with
`BertModel.from_pretrained(language_model_name_or_path)`, and both projections as Linear(hidden, hidden).
The sizes a folder does not record are read from its tensor shapes (`clip_hf_with_shapes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3d_jax.convert.keymap import LINEAR, KeyMap, Rule
from m3d_jax.convert.kind import Kind, Part, Source, read_config_json
from m3d_jax.convert.text_encoder import (
    Shapes, assumed_num_heads, bert_config_from_shapes, bert_keymap, checkpoint_shapes, count_layers,
)
from m3d_jax.convert.torch_io import CheckpointReader, CheckpointReadError
from m3d_jax.convert.vit3d import vit3d_keymap
from m3d_jax.models.clip import ClipConfig, M3DClip


def clip_keymap(config: ClipConfig) -> KeyMap:
    """The whole M3D-CLIP state dict."""
    heads = [Rule("logit_scale", "logit_scale")]
    for name in ("mm_vision_proj", "mm_language_proj"):
        heads += [Rule(f"{name}.weight", f"{name}.kernel", LINEAR), Rule(f"{name}.bias", f"{name}.bias")]
    return KeyMap.combine(
        "m3d_clip",
        vit3d_keymap(config.vision, "m3d_clip_vision").nested("vision_encoder.", "vision_encoder."),
        bert_keymap(config.text).nested("language_encoder.", "language_encoder."),
        KeyMap("clip_heads", tuple(heads)),
    )


def clip_hf_with_shapes(hf: Mapping[str, Any], shapes: Shapes, where: str, key_prefix: str = "") -> dict[str, Any]:
    """A released M3D-CLIP config dict completed from the checkpoint's tensor `shapes`: the ViT's width, MLP
    width and depth where the dict lacks them, `text_config` (the whole BERT, see `bert_config_from_shapes`)
    and `embed_dim` (the projections' output width). Head counts not recorded are assumed with a warning
    naming `where` and the config.json key (under `key_prefix`) that would record them. Recorded values
    are kept; a disagreeing tensor is then a key-map shape error."""
    hf = dict(hf)
    cls_token = shapes.get("vision_encoder.cls_token")
    if cls_token is not None:
        hf.setdefault("hidden_size", cls_token[-1])
    if "vision_encoder.blocks.0.mlp.linear1.weight" in shapes:
        hf.setdefault("mlp_dim", shapes["vision_encoder.blocks.0.mlp.linear1.weight"][0])
        hf.setdefault("num_layers", count_layers(shapes, r"vision_encoder\.blocks\.(\d+)\."))
    if "num_heads" not in hf and "hidden_size" in hf:
        hf["num_heads"] = assumed_num_heads(hf["hidden_size"], where, "3D ViT", f"{key_prefix}num_heads")
    if "text_config" not in hf:
        hf["text_config"] = bert_config_from_shapes(shapes, where, prefix="language_encoder.",
                                                    heads_key=f"{key_prefix}text_config.num_attention_heads").to_hf()
    vision_proj, language_proj = shapes.get("mm_vision_proj.weight"), shapes.get("mm_language_proj.weight")
    if "embed_dim" not in hf and vision_proj is not None and language_proj is not None:
        if vision_proj[0] != language_proj[0]:
            raise CheckpointReadError(f"{where}: mm_vision_proj projects to {vision_proj[0]} features but "
                                      f"mm_language_proj to {language_proj[0]}; M3D-CLIP needs one width")
        hf["embed_dim"] = vision_proj[0]
    return hf


def released_clip_hf(folder: str | os.PathLike, hf: Mapping[str, Any] | None = None,
                     reader: CheckpointReader | None = None, key_prefix: str = "") -> dict[str, Any]:
    """The config.json dict of a released M3D-CLIP folder (`hf` if already read) with the unrecorded sizes
    read from its tensor shapes (`clip_hf_with_shapes`)."""
    hf = read_config_json(Path(folder) / "config.json") if hf is None else hf
    return clip_hf_with_shapes(hf, checkpoint_shapes(reader or CheckpointReader(folder)), str(folder), key_prefix)


def _recognise(source: Source) -> ClipConfig | None:
    if source.hf is None or source.hf.get("model_type") != "m3d_clip":
        return None
    return KIND.parse(released_clip_hf(source.path, source.hf, source.reader), source.path / "config.json")


KIND = Kind(
    "clip", "M3D-CLIP", M3DClip, ClipConfig.from_hf, ClipConfig.to_hf, _recognise,
    released="model_type m3d_clip", parts=(Part("", "", clip_keymap),),
)
