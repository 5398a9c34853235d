"""Every config file builds its model config; command-line overrides reach the model."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from m3d_jax.models.decoder import DecoderConfig
from m3d_jax.models.decoder_presets import PRESETS
from m3d_jax.models.vit3d import ViT3DConfig

CONFIGS = sorted(p for p in pathlib.Path(__file__).parent.parent.joinpath("configs").glob("*.py") if p.name != "__init__.py")
VIT_CONFIGS = [path for path in CONFIGS if path.name in ("m3d_clip_vit3d.py", "vit3d_tiny.py")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    assert len(_load(path).keys()) > 0
DECODER_CONFIG = CONFIGS[0].with_name("decoder.py")


def _load(path, *overrides):
    argv = ["prog", f"--config={path}", *overrides]  # path may carry ":arg" for get_config(arg)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(path), flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("path", VIT_CONFIGS, ids=lambda p: p.name)
def test_config_builds_model_config(path):
    config = _load(path)
    model = ViT3DConfig.from_dict(config.model)
    assert model.num_patches == (model.image_size[0] // model.patch_size[0]) * (
        model.image_size[1] // model.patch_size[1]) * (model.image_size[2] // model.patch_size[2])


def test_full_size_config_is_the_released_m3d_clip_tower():
    model = ViT3DConfig.from_dict(_load(CONFIGS[0].with_name("m3d_clip_vit3d.py")).model)
    assert (model.image_size, model.patch_size, model.num_patches, model.num_tokens) == (
        (32, 256, 256), (4, 16, 16), 2048, 2049)
    assert (model.hidden_size, model.mlp_dim, model.num_layers, model.num_heads) == (768, 3072, 12, 12)


def test_overrides_reach_the_model_config():
    config = _load(CONFIGS[0].with_name("vit3d_tiny.py"), "--config.model.num_layers=5",
                   "--config.model.attention_impl=xla", "--config.model.image_size=(8,32,32)")
    model = ViT3DConfig.from_dict(config.model)
    assert (model.num_layers, model.attention_impl, model.image_size, model.num_patches) == (5, "xla", (8, 32, 32), 8)


def test_unknown_and_inconsistent_fields_are_rejected():
    with pytest.raises(ValueError, match=r"unknown ViT3DConfig keys \['num_layer'\]"):
        ViT3DConfig.from_dict({"num_layer": 3})
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ViT3DConfig(image_size=(30, 256, 256))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_decoder_config_file_builds_every_preset(preset):
    config = _load(f"{DECODER_CONFIG}:{preset}", "--config.model.dtype=bfloat16")
    model = DecoderConfig.from_dict(config.model)
    assert model == dataclasses.replace(PRESETS[preset](), dtype="bfloat16")
