"""Released M3D-CLIP checkpoints (`model_type` m3d_clip) ↔ JAX: `vision_encoder.*` (the 3D ViT with its
cls token), `language_encoder.*` (a BertModel), `mm_vision_proj`, `mm_language_proj`, `logit_scale`."""

from __future__ import annotations

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
    import dataclasses

    config = ClipConfig.from_hf(read_hf_config(folder))
    config = dataclasses.replace(config, **overrides) if overrides else config
    return load_model(folder, clip_keymap(config), lambda: M3DClip(config, rngs=nnx.Rngs(0)))


def export_clip(model: M3DClip, out_dir: str | os.PathLike, *, dtype=None) -> None:
    """Writes the model in the released M3D-CLIP layout (config.json + safetensors)."""
    write_state(out_dir, clip_keymap(model.config), nnx.state(model), dtype=dtype, config=model.config.to_hf())
