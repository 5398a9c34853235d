"""Released M3D-LaMed checkpoints (Phi-3 and Llama-2 variants, with or without the seg module): their key
map and kind, and export of the language model alone as a plain transformers folder."""

from __future__ import annotations

import os
from pathlib import Path

from m3d_jax.convert.decoder import decoder_keymap, export_hf_decoder
from m3d_jax.convert.keymap import LINEAR, KeyMap, Rule
from m3d_jax.convert.kind import Kind, Part, Source
from m3d_jax.convert.segvol import segvol_keymap
from m3d_jax.convert.vit3d import vit3d_keymap
from m3d_jax.models.lamed import Lamed, LamedConfig


def lamed_keymap(config: LamedConfig) -> KeyMap:
    """The whole released state dict: LLM (`model.*`, `lm_head`), `model.vision_tower.vision_tower.*`,
    `model.mm_projector.projector.*`, and with segvol `model.seg_projector.*`, `model.seg_module.*`."""
    parts = [
        decoder_keymap(config.decoder).nested("", "language_model."),
        vit3d_keymap(config.vision, "m3d_clip_vision").nested("model.vision_tower.vision_tower.", "vision_tower."),
    ]
    stride = 2 if config.proj_layer_type == "mlp" else 1  # mlp: Linear, GELU, Linear, ...
    projector = []
    for index in range(config.proj_layer_num):
        torch_name = f"model.mm_projector.projector.{stride * index}"
        projector += [Rule(f"{torch_name}.weight", f"mm_projector.layers.{index}.kernel", LINEAR),
                      Rule(f"{torch_name}.bias", f"mm_projector.layers.{index}.bias")]
    if config.segvol is not None:
        for torch_index, name in ((0, "fc1"), (2, "fc2")):
            projector += [Rule(f"model.seg_projector.{torch_index}.weight", f"seg_projector.{name}.kernel", LINEAR),
                          Rule(f"model.seg_projector.{torch_index}.bias", f"seg_projector.{name}.bias")]
        parts.append(segvol_keymap(config.segvol, prefix="").nested("model.seg_module.", "seg_module."))
    parts.append(KeyMap("projectors", tuple(projector)))
    return KeyMap.combine(f"lamed/{config.decoder.architecture}", *parts)


def export_language_model(model: Lamed, out_dir: str | os.PathLike, *, tokenizer=None, dtype=None,
                          max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """The LLM alone (with the added tokens' embedding rows) as a plain Phi-3 / Llama folder that
    transformers loads without remote code; the tokenizer is saved beside it when given."""
    written = export_hf_decoder(model.language_model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return written


def _recognise(source: Source) -> LamedConfig | None:
    if source.hf is None or not str(source.hf.get("model_type", "")).startswith("lamed"):
        return None
    return KIND.parse(source.hf, source.path / "config.json")


KIND = Kind(
    "lamed", "M3D-LaMed", Lamed, LamedConfig.from_hf, LamedConfig.to_hf, _recognise,
    released="model_type lamed_phi3 or lamed_llama", parts=(Part("", "", lamed_keymap),),
)
