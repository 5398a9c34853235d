"""UNETR against MONAI's `UNETR` (logits and encoder tokens), the key map both ways, config validation, and
the full-size parameter count and checkpoint shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from conftest import prefixed_state_dict, randomize_norms_and_biases
from m3d_jax.convert import CheckpointReader, write_state
from m3d_jax.convert.keymap import torch_shapes
from m3d_jax.convert.unetr import load_unetr, unetr_keymap
from m3d_jax.models.unetr import Unetr, UnetrConfig
from m3d_jax.models.vit3d import ViT3DConfig

# 32³ volumes: a 2³ patch grid, so every up-path runs (16³ → … → 32³) on a 12-block ViT of width 48.
TINY = UnetrConfig(
    vit=ViT3DConfig(image_size=(32, 32, 32), patch_size=(16, 16, 16), hidden_size=48, mlp_dim=96, num_heads=4,
                    cls_token=False),
    feature_size=8, out_channels=3,
)
# (proj_type, res_block, conv_block): MONAI's defaults with the perceptron embedding, and every other branch.
VARIANTS = [("perceptron", True, True), ("conv", False, False)]
VARIANT_IDS = ["perceptron_res_conv", "conv_basic_bare"]


def _monai_unetr(config: UnetrConfig, proj_type: str, seed: int = 0) -> torch.nn.Module:
    """MONAI's UNETR with the config's sizes; norms and biases randomised (MONAI starts them at 1 / 0)."""
    from monai.networks.nets import UNETR

    torch.manual_seed(seed)
    vit = config.vit
    model = UNETR(
        in_channels=vit.in_channels, out_channels=config.out_channels, img_size=vit.image_size,
        feature_size=config.feature_size, hidden_size=vit.hidden_size, mlp_dim=vit.mlp_dim, num_heads=vit.num_heads,
        proj_type=proj_type, norm_name="instance", conv_block=config.conv_block, res_block=config.res_block,
        dropout_rate=0.0, qkv_bias=vit.qkv_bias,
    ).eval()
    randomize_norms_and_biases(model)
    return model


def _variant(proj_type: str, res_block: bool, conv_block: bool, tmp_path):
    config = dataclasses.replace(TINY, res_block=res_block, conv_block=conv_block)
    monai_model = _monai_unetr(config, proj_type)
    path = tmp_path / "unetr.safetensors"
    save_file(prefixed_state_dict(monai_model), str(path))
    return config, monai_model, path


def _max_abs(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float32) - expected)))


@pytest.mark.parametrize(("proj_type", "res_block", "conv_block"), VARIANTS, ids=VARIANT_IDS)
def test_unetr_matches_monai_fp32(proj_type, res_block, conv_block, tmp_path, rng):
    config, monai_model, path = _variant(proj_type, res_block, conv_block, tmp_path)
    model, report = load_unetr(path, config, proj_type)
    assert {key for key, _ in report.ignored} == {
        f"vit.blocks.{i}.norm_cross_attn.{p}" for i in range(12) for p in ("weight", "bias")
    }
    volumes = rng.standard_normal((2, 1, 32, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref_logits = monai_model(torch.from_numpy(volumes)).numpy()
        ref_tokens, ref_hidden = monai_model.vit(torch.from_numpy(volumes))

    @jax.jit
    def run(model, volumes):
        tokens, hidden_states = model.encode(volumes)
        features = model.decode(volumes, tokens, hidden_states)
        return tokens, hidden_states, features, model(volumes)

    tokens, hidden_states, features, logits = run(model, jnp.asarray(volumes))
    assert tokens.shape == (2, 8, 48) and len(hidden_states) == 12
    assert features.shape == (2, 32, 32, 32, 8) and logits.shape == (2, 3, 32, 32, 32)
    assert _max_abs(tokens, ref_tokens.numpy()) <= 1e-5
    for layer in config.skip_layers:
        assert _max_abs(hidden_states[layer], ref_hidden[layer].numpy()) <= 1e-5, layer
    err = _max_abs(logits, ref_logits)
    assert err <= 1e-5, f"logits max |Δ| {err:.3g} (max |ref| {np.abs(ref_logits).max():.3g})"
    head = jnp.einsum("bdhwc,co->bodhw", features, model.out.kernel[0, 0, 0]) + model.out.bias[...][:, None, None, None]
    assert _max_abs(head, ref_logits) <= 1e-5  # `decode` is decoder2's output, right before `out`


@pytest.mark.parametrize(("proj_type", "res_block", "conv_block"), VARIANTS, ids=VARIANT_IDS)
def test_keymap_round_trip_is_bit_identical_and_loads_into_monai(proj_type, res_block, conv_block, tmp_path):
    config, monai_model, path = _variant(proj_type, res_block, conv_block, tmp_path)
    model, report = load_unetr(path, config, proj_type)
    write_state(tmp_path / "export", unetr_keymap(config, proj_type), nnx.state(model, nnx.Param))
    reader = CheckpointReader(tmp_path / "export")
    exported = {key: reader.read(key) for key in reader.keys()}  # noqa: SIM118 (the reader is not iterable)
    original = monai_model.state_dict()
    ignored = {key for key, _ in report.ignored}
    assert sorted(exported) == sorted(set(original) - ignored)
    for key, tensor in exported.items():
        assert tensor.dtype == np.float32 and np.array_equal(tensor, original[key].numpy()), key

    fresh = _monai_unetr(config, proj_type, seed=1)
    result = fresh.load_state_dict({key: torch.from_numpy(np.array(t)) for key, t in exported.items()}, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == ignored


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vit": dataclasses.replace(TINY.vit, cls_token=True)}, "cls_token must be False"),
        ({"vit": dataclasses.replace(TINY.vit, patch_size=(8, 8, 8))}, "patch_size"),
        ({"vit": dataclasses.replace(TINY.vit, select_final_norm=False)}, "select_final_norm"),
        ({"skip_layers": (3, 6, 12)}, "skip_layers"),
        ({"vit": dataclasses.replace(TINY.vit, num_layers=9)}, "skip_layers"),
        ({"norm": "batch"}, "only norm 'instance'"),
    ],
    ids=["cls_token", "patch_8", "unnormed_features", "skip_out_of_range", "too_few_layers", "batch_norm"],
)
def test_invalid_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_from_dict_fills_unetr_vit_defaults_and_dtype():
    config = UnetrConfig.from_dict({"vit": {"hidden_size": 48, "num_heads": 4}, "feature_size": 8, "dtype": "bfloat16"})
    assert config.vit.image_size == (128, 128, 128) and config.vit.patch_size == (16, 16, 16)
    assert not config.vit.cls_token and config.vit.dtype == "bfloat16" and config.dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown UnetrConfig keys"):
        UnetrConfig.from_dict({"features": 8})


def test_full_size_matches_monai_parameter_count_and_checkpoint_shapes():
    from monai.networks.nets import UNETR

    config = UnetrConfig()  # MONAI's published UNETR (ViT-B, feature_size 16) at a 128³ crop, 2 classes
    monai_model = UNETR(in_channels=1, out_channels=2, img_size=(128, 128, 128), proj_type="perceptron")
    abstract = nnx.state(nnx.eval_shape(lambda: Unetr(config, rngs=nnx.Rngs(0))), nnx.Param)
    ours = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    # MONAI's TransformerBlock always builds `norm_cross_attn`, unused without cross-attention (not ported).
    unused = {key: p.numel() for key, p in monai_model.named_parameters() if "norm_cross_attn" in key}
    assert ours == sum(p.numel() for p in monai_model.parameters()) - sum(unused.values()) == 93_011_170
    expected = {key: tuple(t.shape) for key, t in monai_model.state_dict().items() if key not in unused}
    assert torch_shapes(unetr_keymap(config), abstract) == expected
