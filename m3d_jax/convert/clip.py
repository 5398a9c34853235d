"""Released M3D-CLIP checkpoints (`model_type` m3d_clip) ↔ JAX: `vision_encoder.*` (the 3D ViT with its
cls token), `language_encoder.*` (a BertModel), `mm_vision_proj`, `mm_language_proj`, `logit_scale`."""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from m3d_jax.convert.decoder import read_hf_config
from m3d_jax.convert.keymap import LINEAR, ConversionReport, KeyMap, Rule, load_model, write_state
from m3d_jax.convert.text_encoder import bert_keymap
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


def load_clip(folder: str | os.PathLike, **overrides) -> tuple[M3DClip, ConversionReport]:
    """Loads a released M3D-CLIP folder (config.json + safetensors or .bin)."""
    config = ClipConfig.from_hf(read_hf_config(folder))
    config = dataclasses.replace(config, **overrides) if overrides else config
    return load_model(folder, clip_keymap(config), lambda: M3DClip(config, rngs=nnx.Rngs(0)))


def load_clip_folder(folder: str | os.PathLike) -> M3DClip:
    """An m3d-jax M3D-CLIP parameter folder or a released PyTorch folder (converted in memory)."""
    from m3d_jax.convert.checkpoint import KIND_KEY, load_jax
    from m3d_jax.convert.torch_io import CheckpointReadError

    hf = read_hf_config(folder)
    if hf.get(KIND_KEY) == "clip":
        return load_jax(folder)
    if KIND_KEY in hf or hf.get("model_type") != "m3d_clip":
        raise CheckpointReadError(f"{os.path.join(folder, 'config.json')}: not an M3D-CLIP checkpoint "
                                  f"(model_type {hf.get('model_type')!r}, kind {hf.get(KIND_KEY)!r})")
    return load_clip(folder)[0]


def export_clip(model: M3DClip, out_dir: str | os.PathLike, *, dtype=None) -> None:
    """Writes the model in the released M3D-CLIP layout (config.json + safetensors)."""
    write_state(out_dir, clip_keymap(model.config), nnx.state(model), dtype=dtype, config=model.config.to_hf())
