"""The SigLIP slice encoder against transformers' SiglipVisionModel (fp32, tiny random weights with non-trivial
norms and biases): every layer, both feature choices, the pooling head, Med-2E3's slice batching, and the
checkpoint layout both ways."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from conftest import prefixed_state_dict
from m3d_jax.convert.keymap import CheckpointMismatchError, write_state
from m3d_jax.convert.slice_encoder import load_siglip_vision, siglip_vision_keymap
from m3d_jax.models.slice_encoder import SiglipVision, SiglipVisionConfig, encode_slices
from m3d_jax.sharding import logical_axes

TINY_SIGLIP = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TOLERANCE = 1e-5  # absolute max |Δ|; the reference values reach about 6


def random_siglip(seed: int = 0) -> transformers.SiglipVisionModel:
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP)).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 and 0)
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif "bias" in name:
                parameter.normal_(0, 0.05)
    return model


def saved_prefix(model: transformers.SiglipVisionModel) -> str:
    """Where `save_pretrained` puts the keys: under "vision_model." up to transformers 4.x, at the root from 5."""
    return "vision_model." if next(iter(model.state_dict())).startswith("vision_model.") else ""


def released_state_dict(model: transformers.SiglipVisionModel) -> dict[str, torch.Tensor]:
    """The state dict with keys under "vision_model." (Med-2E3's `vision2d_model/pytorch_model.bin` layout)."""
    return {"vision_model." + key.removeprefix("vision_model."): value
            for key, value in prefixed_state_dict(model).items()}


def write_siglip(tmp_path, seed: int = 0) -> tuple[transformers.SiglipVisionModel, str]:
    """Saves a random tiny SiglipVisionModel in the released (transformers 4.x / Med-2E3) key layout."""
    reference = random_siglip(seed)
    path = str(tmp_path / "siglip.safetensors")
    save_file(released_state_dict(reference), path)
    return reference, path


forward = nnx.jit(lambda model, images: model(images))
forward_all = nnx.jit(lambda model, images: model(images, output_hidden_states=True))


def error(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32)).max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return write_siglip(tmp_path_factory.mktemp("siglip"))


def test_siglip_matches_transformers_every_layer_prenorm_postnorm_and_head_fp32(converted):
    reference, path = converted
    model, report = load_siglip_vision(path, SiglipVisionConfig.from_hf(TINY_SIGLIP))
    assert report.converted == len(reference.state_dict())
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images), output_hidden_states=True)
    out = forward_all(model, jnp.asarray(images))
    assert len(out.hidden_states) == len(expected.hidden_states) == 4  # embeddings + 3 layers
    errors = {f"hidden_states[{i}]": error(ours, theirs)
              for i, (ours, theirs) in enumerate(zip(out.hidden_states, expected.hidden_states, strict=True))}
    errors["features (pre-norm)"] = error(out.features, expected.hidden_states[-1])
    errors["last_hidden_state"] = error(out.last_hidden_state, expected.last_hidden_state)
    errors["pooled"] = error(out.pooled, expected.pooler_output)
    assert max(errors.values()) <= TOLERANCE, errors
    # Without hidden states, the default (Med-2E3) feature is the same pre-norm last layer.
    plain = forward(model, jnp.asarray(images))
    assert plain.hidden_states is None
    assert error(plain.features, expected.hidden_states[-1]) <= TOLERANCE


def test_select_layer_post_norm_and_scanned_layers_pick_hf_hidden_states(converted):
    reference, path = converted
    images = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images), output_hidden_states=True)
    base = SiglipVisionConfig.from_hf(TINY_SIGLIP)
    post, _ = load_siglip_vision(path, dataclasses.replace(base, select_post_norm=True))
    assert error(forward(post, jnp.asarray(images)).features, expected.last_hidden_state) <= TOLERANCE
    earlier, _ = load_siglip_vision(path, dataclasses.replace(base, select_layer=-2))
    out = forward(earlier, jnp.asarray(images))
    assert error(out.features, expected.hidden_states[-2]) <= TOLERANCE
    assert out.last_hidden_state is None and out.pooled is None  # the last layer was not run
    # One lax.scan over the stacked layers, rematerialised, reads the same parameters.
    scanned, _ = load_siglip_vision(path, dataclasses.replace(base, select_layer=0, scan_layers=True, remat="full"))
    out = forward_all(scanned, jnp.asarray(images))
    assert error(out.features, expected.hidden_states[1]) <= TOLERANCE
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert error(ours, theirs) <= TOLERANCE
    assert error(out.pooled, expected.pooler_output) <= TOLERANCE


def test_encode_slices_equals_transformers_on_stacked_three_channel_slices(converted):
    reference, path = converted
    model, _ = load_siglip_vision(path, SiglipVisionConfig.from_hf(TINY_SIGLIP))
    volume = np.random.default_rng(3).random((2, 1, 4, 32, 32), dtype=np.float32)
    # Med-2E3: transpose(1, 2) → [B, D, 1, H, W] → view [B·D, 1, H, W] → expand to 3 channels, no normalisation.
    slices = torch.from_numpy(volume).transpose(1, 2).reshape(8, 1, 32, 32).expand(8, 3, 32, 32)
    with torch.no_grad():
        expected = reference(slices, output_hidden_states=True).hidden_states[-1].reshape(2, 4, 16, 64)
    out = nnx.jit(encode_slices)(model, jnp.asarray(volume))
    assert out.shape == (2, 4, 16, 64)
    assert error(out, expected) <= TOLERANCE
    with pytest.raises(ValueError, match=r"expected volumes of shape \[B, 1, D, 32, 32\]"):
        encode_slices(model, jnp.zeros((2, 3, 4, 32, 32)))


def test_export_round_trip_is_bit_identical(converted, tmp_path):
    _, path = converted
    config = SiglipVisionConfig.from_hf(TINY_SIGLIP)
    model, _ = load_siglip_vision(path, config)
    write_state(tmp_path / "export", siglip_vision_keymap(config), nnx.state(model, nnx.Param), config=config.to_hf())
    original, exported = load_file(path), load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[key], original[key]) for key in original)
    # The exported folder is a loadable transformers checkpoint (prefix stripped by base_model_prefix).
    again = released_state_dict(transformers.SiglipVisionModel.from_pretrained(tmp_path / "export"))
    assert all(torch.equal(again[key], original[key]) for key in original)


def test_transformers_save_pretrained_folder_loads_with_its_config_and_prefix(tmp_path):
    reference = random_siglip(seed=4)
    reference.save_pretrained(tmp_path / "hf")  # transformers >= 5 writes keys without "vision_model."
    config = SiglipVisionConfig.from_hf(json.load(open(tmp_path / "hf" / "config.json")))
    model, _ = load_siglip_vision(tmp_path / "hf", config, prefix=saved_prefix(reference))
    images = np.random.default_rng(4).random((1, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).pooler_output
    assert error(forward(model, jnp.asarray(images)).pooled, expected) <= TOLERANCE


def test_missing_key_names_it_and_position_ids_buffer_is_ignored(tmp_path):
    state = released_state_dict(random_siglip())
    state["vision_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state, str(tmp_path / "extra.safetensors"))
    _, report = load_siglip_vision(tmp_path / "extra.safetensors", SiglipVisionConfig.from_hf(TINY_SIGLIP))
    assert [key for key, _ in report.ignored] == ["vision_model.embeddings.position_ids"]
    del state["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)broken.safetensors.*1 missing keys: vision_model.encoder.layers.1.self_attn.k_proj"):
        load_siglip_vision(tmp_path / "broken.safetensors", SiglipVisionConfig.from_hf(TINY_SIGLIP))


def test_full_size_parameter_count_matches_siglip_large_patch16_256():
    config = SiglipVisionConfig()
    assert config.num_patches == 256 and config.head_dim == 64
    abstract = nnx.eval_shape(lambda: SiglipVision(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == 315_956_224  # the research note's count of vision2d_model (head included)
    with torch.device("meta"):
        reference = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**config.to_hf()))
    assert ours == sum(p.numel() for p in reference.parameters())
    headless = nnx.eval_shape(lambda: SiglipVision(dataclasses.replace(config, use_head=False), rngs=nnx.Rngs(0)))
    assert headless.head is None


def test_config_from_full_siglip_config_uses_hf_defaults_and_round_trips():
    # google/siglip-large-patch16-256's config.json leaves out fields equal to transformers' defaults.
    hf = dict(model_type="siglip", text_config=dict(hidden_size=1024),
              vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                 num_hidden_layers=24, image_size=256))
    config = SiglipVisionConfig.from_hf(hf)
    assert config == SiglipVisionConfig()
    assert SiglipVisionConfig.from_hf(config.to_hf()) == config
    assert SiglipVisionConfig.from_hf(transformers.SiglipVisionConfig(**config.to_hf()).to_dict()) == config
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        SiglipVisionConfig(image_size=250)


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: SiglipVision(SiglipVisionConfig(), rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(variable)
        assert axes is not None and len(axes) == len(variable.shape), (path, axes, variable.shape)
    assert all(logical_axes(v)[0] == "layers" for _, v in nnx.to_flat_state(nnx.state(model.layers, nnx.Param)))


def test_bfloat16_compute_stays_close_to_fp32(converted):
    _, path = converted
    base = SiglipVisionConfig.from_hf(TINY_SIGLIP)
    fp32, _ = load_siglip_vision(path, base)
    bf16, _ = load_siglip_vision(path, dataclasses.replace(base, dtype="bfloat16"))
    images = jnp.asarray(np.random.default_rng(5).random((2, 3, 32, 32), dtype=np.float32))
    out = forward(bf16, images)
    assert out.features.dtype == jnp.bfloat16
    ref = np.asarray(forward(fp32, images).features)
    assert np.abs(np.asarray(out.features, np.float32) - ref).max() / np.abs(ref).max() < 0.05


def test_wrong_image_shape_names_expected_shape():
    model = nnx.eval_shape(lambda: SiglipVision(SiglipVisionConfig.from_hf(TINY_SIGLIP), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, 32, 32\] \(channels first\)"):
        model(jnp.zeros((1, 32, 32, 3)))
