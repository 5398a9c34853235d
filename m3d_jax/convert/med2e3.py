"""Released Med-2E3 folders ↔ JAX. The reference saves each part separately:

  config.json            MedMLLMConfig with nested llm / vision2d / vision3d / connector configs
  llm/                   transformers Phi3ForCausalLM (`model.*`, `lm_head.weight`)
  vision2d_model/        transformers SiglipVisionModel (`vision_model.*`)
  vision2d_connector/    `_connector.{0,2}.{weight,bias}`
  vision3d_model/        M3D-CLIP (`vision_encoder.*`, `language_encoder.*`, `mm_*_proj`, `logit_scale`)
  vision3d_connector/    `_connector.{0,2}.*` and `text_mlp.{weight,bias}`

each as `.safetensors` or `pytorch_model.bin`. `text_mlp` IS loaded here: the reference's connector loader
keeps only `_connector.*`, so its inference runs TG-IS with a freshly random `text_mlp`. A checkpoint without
`text_mlp` is an error unless `init_missing_text_mlp=True` (then it is initialised and a warning logged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from absl import logging
from flax import nnx

from m3d_jax.convert.clip import clip_keymap, released_clip_hf
from m3d_jax.convert.decoder import decoder_keymap
from m3d_jax.convert.keymap import LINEAR, ConversionReport, KeyMap, Rule, read_state, write_state
from m3d_jax.convert.slice_encoder import siglip_vision_keymap
from m3d_jax.convert.torch_io import CheckpointReader, CheckpointReadError, atomic_output
from m3d_jax.layers import Dense
from m3d_jax.layers.params import canonical_dtype
from m3d_jax.models.med2e3 import Med2E3, Med2E3Config

PARTS = ("llm", "vision2d_model", "vision2d_connector", "vision3d_model", "vision3d_connector")


def _connector_rules(num_layers: int, jax_prefix: str) -> list[Rule]:
    rules = []
    for index in range(num_layers):  # Sequential(Linear, GELU, Linear): Linear i sits at index 2i
        rules += [Rule(f"_connector.{2 * index}.weight", f"{jax_prefix}layers.{index}.kernel", LINEAR),
                  Rule(f"_connector.{2 * index}.bias", f"{jax_prefix}layers.{index}.bias")]
    return rules


def med2e3_keymaps(config: Med2E3Config, *, text_mlp: bool = True) -> dict[str, KeyMap]:
    """One key map per released part folder (JAX paths relative to that sub-module)."""
    connector3d = _connector_rules(config.connector_layers, "projector.")
    if text_mlp:
        connector3d += [Rule("text_mlp.weight", "text_mlp.kernel", LINEAR), Rule("text_mlp.bias", "text_mlp.bias")]
    return {
        "llm": decoder_keymap(config.decoder),
        "vision2d_model": siglip_vision_keymap(config.vision2d),
        "vision2d_connector": KeyMap("med2e3/vision2d_connector", tuple(_connector_rules(config.connector_layers, ""))),
        "vision3d_model": clip_keymap(config.vision3d),
        "vision3d_connector": KeyMap("med2e3/vision3d_connector", tuple(connector3d)),
    }


def read_config(folder: str | os.PathLike) -> dict:
    """The MedMLLMConfig dict: `config.json` at the root, else `args/config.json` (written at train start)."""
    for candidate in (Path(folder) / "config.json", Path(folder) / "args" / "config.json"):
        if candidate.is_file():
            try:
                hf = json.loads(candidate.read_text())
            except json.JSONDecodeError as err:
                raise CheckpointReadError(f"{candidate}: not valid JSON ({err})") from None
            if "llm_config" in hf:
                return hf
    raise CheckpointReadError(f"{folder}: no Med-2E3 config.json (root or args/) with nested llm_config")


def with_vision3d_shapes(folder: str | os.PathLike, hf: dict, reader: CheckpointReader | None = None) -> dict:
    """The MedMLLMConfig dict `hf` with `vision3d_model_config` completed from `vision3d_model/`'s tensor
    shapes: the reference builds that part's BERT from the hub and records none of its sizes (nor the
    projection widths); see m3d_jax.convert.clip.clip_hf_with_shapes."""
    if "vision3d_model_config" not in hf:  # Med2E3Config.from_hf names what is missing
        return hf
    part = Path(folder) / "vision3d_model"
    vision3d = released_clip_hf(part, hf["vision3d_model_config"], reader, key_prefix="vision3d_model_config.")
    return {**hf, "vision3d_model_config": vision3d}


def load_med2e3(folder: str | os.PathLike, *, init_missing_text_mlp: bool = False, **decoder_overrides
                ) -> tuple[Med2E3, dict[str, ConversionReport]]:
    """Loads a released Med-2E3 folder; returns the model and a conversion report per part."""
    folder = Path(folder)
    hf = read_config(folder)
    for part in PARTS:
        if not (folder / part).is_dir():
            raise CheckpointReadError(f"{folder / part}: missing; a Med-2E3 folder holds {', '.join(PARTS)}")
    readers = {part: CheckpointReader(folder / part) for part in PARTS}
    config = Med2E3Config.from_hf(with_vision3d_shapes(folder, hf, readers["vision3d_model"]), **decoder_overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Med2E3(config, rngs=nnx.Rngs(0))))
    has_text_mlp = "text_mlp.weight" in readers["vision3d_connector"].keys()
    if not has_text_mlp and init_missing_text_mlp:
        logging.warning("%s has no text_mlp (a checkpoint saved by the reference's loader path?); it is initialised "
                        "randomly, so text-guided slice scores are meaningless until it is trained", folder)
    keymaps = med2e3_keymaps(config, text_mlp=has_text_mlp or not init_missing_text_mlp)
    reports = {}
    for part in PARTS:
        part_state = abstract[part]
        if part == "vision3d_connector" and not has_text_mlp and init_missing_text_mlp:
            fresh = Dense(config.vision3d.text.hidden_size, config.decoder.hidden_size, axes=("mlp2", "embed"),
                          param_dtype=canonical_dtype(config.decoder.param_dtype), rngs=nnx.Rngs(0))
            part_state = nnx.State({k: v for k, v in part_state.items() if k != "text_mlp"})
        state, reports[part] = read_state(readers[part], keymaps[part], part_state)
        if part == "vision3d_connector" and not has_text_mlp and init_missing_text_mlp:
            state["text_mlp"] = nnx.state(fresh)
        abstract[part] = state
    return nnx.merge(graphdef, abstract), reports


def export_med2e3(model: Med2E3, out_dir: str | os.PathLike, *, dtype=None, overwrite: bool = False) -> None:
    """Writes the released folder layout (root config.json + one folder per part, safetensors). The
    folder appears complete or not at all; one that holds something is refused unless `overwrite`, which
    replaces it whole."""
    config = model.config
    hf = config.to_hf()
    part_configs = {"llm": hf["llm_config"], "vision2d_model": hf["vision2d_model_config"],
                    "vision3d_model": hf["vision3d_model_config"]}
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        for part, keymap in med2e3_keymaps(config).items():
            write_state(tmp / part, keymap, nnx.state(getattr(model, part)), dtype=dtype,
                        config=part_configs.get(part))
        (tmp / "config.json").write_text(json.dumps(hf, indent=1))
