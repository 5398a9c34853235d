"""A decoder LLM of a released checkpoint, by preset name (see m3d_jax/models/decoder_presets.py):

  phi3_mini_4k (M3D-LaMed-Phi-3-4B), phi3_mini_128k (Med-2E3, LongRoPE), llama2_7b (M3D-LaMed-Llama-2-7B),
  llama3_8b, llama3_1_8b (llama3 RoPE scaling), tiny_phi3 (tests).

  from m3d_jax.models.decoder import DecoderConfig
  DecoderConfig.from_dict(config.model)   # e.g. inside a training config

Override fields as usual, e.g. `--config.model.dtype=bfloat16 --config.model.scan_layers=True`.
"""

import dataclasses

from ml_collections import ConfigDict

from m3d_jax.models.decoder_presets import PRESETS


def get_config(preset: str = "phi3_mini_4k") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = ConfigDict()
    config.preset = preset
    config.model = ConfigDict(dataclasses.asdict(PRESETS[preset]()))
    return config
