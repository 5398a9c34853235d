"""Released M3D-LaMed checkpoints (Phi-3 and Llama-2 variants, with or without the seg module) ↔ JAX,
and export of the language model alone as a plain transformers folder."""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from m3d_jax.convert.decoder import decoder_keymap, export_hf_decoder, read_hf_config
from m3d_jax.convert.keymap import LINEAR, ConversionReport, KeyMap, Rule, load_model, write_state
from m3d_jax.convert.segvol import segvol_keymap
from m3d_jax.convert.torch_io import CheckpointReadError
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


def load_lamed(folder: str | os.PathLike, **decoder_overrides) -> tuple[Lamed, ConversionReport]:
    """Loads a released M3D-LaMed folder (config.json + safetensors or .bin shards)."""
    config = LamedConfig.from_hf(read_hf_config(folder), **decoder_overrides)
    return load_model(folder, lamed_keymap(config), lambda: Lamed(config, rngs=nnx.Rngs(0)))


def load_lamed_folder(folder: str | os.PathLike) -> Lamed:
    """An m3d-jax LaMed parameter folder or a released PyTorch folder (converted in memory)."""
    from m3d_jax.convert.checkpoint import KIND_KEY, load_jax

    hf = read_hf_config(folder)
    if hf.get(KIND_KEY) == "lamed":
        return load_jax(folder)
    if KIND_KEY in hf or not str(hf.get("model_type", "")).startswith("lamed"):
        raise CheckpointReadError(f"{Path(folder) / 'config.json'}: not an M3D-LaMed checkpoint "
                                  f"(model_type {hf.get('model_type')!r}, kind {hf.get(KIND_KEY)!r})")
    return load_lamed(folder)[0]


def export_lamed(model: Lamed, out_dir: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False) -> list[Path]:
    """Writes the released layout (config.json + sharded safetensors + index); `overwrite` replaces an
    existing `out_dir` whole."""
    return write_state(out_dir, lamed_keymap(model.config), nnx.state(model), dtype=dtype,
                       config=model.config.to_hf(), max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def export_language_model(model: Lamed, out_dir: str | os.PathLike, *, tokenizer=None, dtype=None,
                          max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """The LLM alone (with the added tokens' embedding rows) as a plain Phi-3 / Llama folder that
    transformers loads without remote code; the tokenizer is saved beside it when given."""
    written = export_hf_decoder(model.language_model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return written
