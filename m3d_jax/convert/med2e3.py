"""Released Med-2E3 folders ↔ JAX. The reference saves each part separately:

  config.json            MedMLLMConfig with nested llm / vision2d / vision3d / connector configs
  llm/                   transformers Phi3ForCausalLM (`model.*`, `lm_head.weight`)
  vision2d_model/        transformers SiglipVisionModel (`vision_model.*`)
  vision2d_connector/    `_connector.{0,2}.{weight,bias}`
  vision3d_model/        M3D-CLIP (`vision_encoder.*`, `language_encoder.*`, `mm_*_proj`, `logit_scale`)
  vision3d_connector/    `_connector.{0,2}.*` and `text_mlp.{weight,bias}`

each as `.safetensors` or `pytorch_model.bin`; `KIND` converts them part by part. `text_mlp` IS loaded
here: the reference's connector loader keeps only `_connector.*`, so its inference runs TG-IS with a freshly
random `text_mlp`. A checkpoint without `text_mlp` is an error unless read with `read_without_text_mlp`
(then it is initialised and a warning logged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from absl import logging
from flax import nnx

from m3d_jax.convert.checkpoint import read_parts
from m3d_jax.convert.clip import clip_keymap, released_clip_hf
from m3d_jax.convert.decoder import decoder_keymap
from m3d_jax.convert.keymap import LINEAR, ConversionReport, KeyMap, Rule
from m3d_jax.convert.kind import Kind, Part, Source, detect
from m3d_jax.convert.slice_encoder import siglip_vision_keymap
from m3d_jax.convert.torch_io import CheckpointReader, CheckpointReadError
from m3d_jax.models.med2e3 import Med2E3, Med2E3Config, Vision3DConnector


def _connector_rules(num_layers: int, jax_prefix: str) -> list[Rule]:
    rules = []
    for index in range(num_layers):  # Sequential(Linear, GELU, Linear): Linear i sits at index 2i
        rules += [Rule(f"_connector.{2 * index}.weight", f"{jax_prefix}layers.{index}.kernel", LINEAR),
                  Rule(f"_connector.{2 * index}.bias", f"{jax_prefix}layers.{index}.bias")]
    return rules


def _connector_keymap(config: Med2E3Config, part: str, jax_prefix: str = "") -> KeyMap:
    return KeyMap(f"med2e3/{part}", tuple(_connector_rules(config.connector_layers, jax_prefix)))


# One key map per released part folder (JAX paths relative to that sub-module).
PART_KEYMAPS: dict[str, Callable[[Med2E3Config], KeyMap]] = {
    "llm": lambda config: decoder_keymap(config.decoder),
    "vision2d_model": lambda config: siglip_vision_keymap(config.vision2d),
    "vision2d_connector": lambda config: _connector_keymap(config, "vision2d_connector"),
    "vision3d_model": lambda config: clip_keymap(config.vision3d),
    "vision3d_connector": lambda config: KeyMap("med2e3/vision3d_connector", (
        *_connector_keymap(config, "vision3d_connector", "projector.").rules,
        Rule("text_mlp.weight", "text_mlp.kernel", LINEAR), Rule("text_mlp.bias", "text_mlp.bias"))),
}
PARTS = tuple(PART_KEYMAPS)


def with_vision3d_shapes(folder: str | os.PathLike, hf: dict, reader: CheckpointReader | None = None) -> dict:
    """The MedMLLMConfig dict `hf` with `vision3d_model_config` completed from `vision3d_model/`'s tensor
    shapes: the reference builds that part's BERT from the hub and records none of its sizes (nor the
    projection widths); see m3d_jax.convert.clip.clip_hf_with_shapes."""
    if "vision3d_model_config" not in hf:  # Med2E3Config.from_hf names what is missing
        return hf
    part = Path(folder) / "vision3d_model"
    vision3d = released_clip_hf(part, hf["vision3d_model_config"], reader, key_prefix="vision3d_model_config.")
    return {**hf, "vision3d_model_config": vision3d}


def _recognise(source: Source) -> Med2E3Config | None:
    """A released folder: a MedMLLMConfig (nested `llm_config`) in config.json, or in args/config.json
    (written at train start) when the root has none."""
    for candidate in (source.path / "config.json", source.path / "args" / "config.json"):
        if candidate.is_file():
            try:
                hf = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # reported by the reader of that file, if it is the one that matters
            if isinstance(hf, dict) and "llm_config" in hf:
                return KIND.parse(with_vision3d_shapes(source.path, hf), candidate)
    return None


_PART_CONFIGS = {"llm": "llm_config", "vision2d_model": "vision2d_model_config",
                 "vision3d_model": "vision3d_model_config"}


def _part(name: str) -> Part:
    config_json = (lambda config: config.to_hf()[_PART_CONFIGS[name]]) if name in _PART_CONFIGS else (lambda _: None)
    return Part(name, name, PART_KEYMAPS[name], config_json)


KIND = Kind(
    "med2e3", "Med-2E3", Med2E3, Med2E3Config.from_hf, Med2E3Config.to_hf, _recognise,
    released="a MedMLLMConfig with a nested llm_config in config.json or args/config.json",
    parts=tuple(_part(name) for name in PARTS),
)


def read_without_text_mlp(folder: str | os.PathLike) -> tuple[Med2E3, ConversionReport]:
    """A released folder whose vision3d_connector has no `text_mlp` (saved through the reference's own
    loader, which drops it): every other weight is read and `text_mlp` is initialised, with a warning,
    since text-guided slice scores mean nothing until it is trained."""
    kind, config = detect(folder)
    if kind is not KIND:
        raise CheckpointReadError(f"{folder}: a {kind.title} checkpoint, not a released Med-2E3 folder")
    model = nnx.eval_shape(lambda: Med2E3(config, rngs=nnx.Rngs(0)))
    projector = _connector_keymap(config, "vision3d_connector")
    parts = [part for part in KIND.parts if part.folder != "vision3d_connector"]
    parts.append(Part("vision3d_connector", "vision3d_connector.projector", lambda _: projector))
    report = read_parts(folder, KIND, config, model, parts)
    logging.warning("%s has no text_mlp (a checkpoint saved by the reference's loader path?); it is initialised "
                    "randomly, so text-guided slice scores are meaningless until it is trained", folder)
    model.vision3d_connector.text_mlp = Vision3DConnector(config, rngs=nnx.Rngs(0)).text_mlp
    return model, report
