"""ViT3D against MONAI's ViT (the M3D encoder's origin), run modes, dtypes and metadata."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from conftest import SMALL_VIT_B, TINY, make_monai_vit, monai_features, prefixed_state_dict
from m3d_jax.convert.vit3d import load_vit3d, vit3d_keymap
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig
from m3d_jax.sharding import logical_axes


def _load_from_monai(monai_model, config, tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(prefixed_state_dict(monai_model), str(path))
    model, _ = load_vit3d(path, config)
    return model


def _assert_close(actual, expected, rel=1e-5):
    err = float(np.max(np.abs(np.asarray(actual, np.float32) - expected)))
    bound = rel * float(np.max(np.abs(expected)))
    assert err <= bound, f"max |Δ| {err:.3g} > {bound:.3g} ({rel} × max|ref|)"
    return err


@pytest.mark.parametrize("cls_token", [True, False], ids=["tower_with_cls", "segvol_no_cls"])
def test_vit3d_matches_monai_fp32_every_block(cls_token, tmp_path, rng):
    config = dataclasses.replace(SMALL_VIT_B, cls_token=cls_token)
    monai_model = make_monai_vit(config)
    model = _load_from_monai(monai_model, config, tmp_path)
    images = rng.random((2, 1, 16, 64, 64), dtype=np.float32)
    ref_final, ref_hidden = monai_features(monai_model, images)

    out = model(jnp.asarray(images), output_hidden_states=True)
    assert len(out.hidden_states) == config.num_layers
    for index, (ours, ref) in enumerate(zip(out.hidden_states, ref_hidden)):
        try:
            _assert_close(ours, ref)
        except AssertionError as err:
            raise AssertionError(f"block {index}: {err}") from None
    expected = ref_final[:, 1:] if cls_token else ref_final
    assert out.features.shape == (2, config.num_patches, 768)
    _assert_close(out.features, expected)


@pytest.mark.slow
def test_vit3d_matches_monai_full_size(tmp_path, rng):
    config = ViT3DConfig()  # the released M3D-CLIP tower: 32×256×256, 2048 patches + cls
    monai_model = make_monai_vit(config)
    model = _load_from_monai(monai_model, config, tmp_path)
    images = rng.random((1, 1, 32, 256, 256), dtype=np.float32)
    ref_final, ref_hidden = monai_features(monai_model, images)
    out = jax.jit(lambda m, x: m(x, output_hidden_states=True))(model, jnp.asarray(images))
    for index, (ours, ref) in enumerate(zip(out.hidden_states, ref_hidden)):
        try:
            _assert_close(ours, ref)
        except AssertionError as err:
            raise AssertionError(f"block {index}: {err}") from None
    assert out.features.shape == (1, 2048, 768)
    _assert_close(out.features, ref_final[:, 1:])


def test_select_layer_and_feature_follow_reference(tmp_path, rng):
    monai_model = make_monai_vit(TINY)
    images = rng.random((1, 1, 16, 64, 64), dtype=np.float32)
    ref_final, ref_hidden = monai_features(monai_model, images)
    cases = [
        # M3D's vision_select_layer=-2: hidden_states[-2], not normed, cls dropped.
        ({"select_layer": -2, "select_final_norm": False}, ref_hidden[-2][:, 1:]),
        # Med-2E3: the last block before the final LayerNorm.
        ({"select_layer": -1, "select_final_norm": False}, ref_hidden[-1][:, 1:]),
        # cls_patch keeps the cls token in front.
        ({"select_feature": "cls_patch"}, ref_final),
    ]
    for overrides, expected in cases:
        config = dataclasses.replace(TINY, **overrides)
        model = _load_from_monai(monai_model, config, tmp_path)
        features = model(jnp.asarray(images)).features
        assert features.shape == expected.shape, overrides
        _assert_close(features, expected)


def _features_and_grads(config, images):
    model = ViT3D(config, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(images, output_hidden_states=True)
        return jnp.sum(out.features**2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return out, grads


@pytest.mark.parametrize(
    "variant",
    [dict(scan_layers=True), dict(remat="full"), dict(remat="dots"), dict(scan_layers=True, remat="dots_no_batch")],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_scan_and_remat_equal_plain_loop(variant, rng):
    images = jnp.asarray(rng.random((2, 1, 16, 64, 64), dtype=np.float32))
    plain_out, plain_grads = _features_and_grads(TINY, images)
    out, grads = _features_and_grads(dataclasses.replace(TINY, **variant), images)
    # The same arithmetic, which XLA may fuse differently around the loop, scan and remat boundaries (seen:
    # 8e-7 on an H200, 1e-6 on CPU). Gradients are compared at the scale of the largest one: each variant was
    # within 2e-7 of it from a float64 run of the same weights, while small leaves differ by up to 2% of their own.
    atol = 2e-6
    np.testing.assert_allclose(out.features, plain_out.features, rtol=0, atol=atol)
    for ours, ref in zip(out.hidden_states, plain_out.hidden_states):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * scale)


def test_query_chunked_attention_equals_unchunked(rng):
    images = jnp.asarray(rng.random((1, 1, 16, 64, 64), dtype=np.float32))
    model = ViT3D(dataclasses.replace(TINY, attention_query_chunk=0), rngs=nnx.Rngs(0))
    chunked = ViT3D(dataclasses.replace(TINY, attention_query_chunk=16), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(chunked(images).features, model(images).features, rtol=1e-6, atol=1e-6)


def test_bf16_compute_keeps_fp32_params(rng):
    images = jnp.asarray(rng.random((1, 1, 16, 64, 64), dtype=np.float32))
    fp32 = ViT3D(TINY, rngs=nnx.Rngs(0))
    bf16 = ViT3D(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
    ref = np.asarray(fp32(images).features)
    out = bf16(images).features
    assert out.dtype == jnp.bfloat16
    rel = np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref))
    assert rel < 0.05, rel


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: ViT3D(ViT3DConfig(), rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(variable)
        assert axes is not None and len(axes) == len(variable.shape), (path, axes, variable.shape)
    blocks = nnx.state(model.blocks, nnx.Param)
    assert all(logical_axes(v)[0] == "layers" for _, v in nnx.to_flat_state(blocks))


def test_wrong_input_shape_names_expected_shape():
    model = ViT3D(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 16, 64, 64\]"):
        model(jnp.zeros((1, 1, 32, 64, 64)))


def test_full_size_parameter_count_matches_monai():
    config = ViT3DConfig()
    abstract = nnx.eval_shape(lambda: ViT3D(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):
        monai_model = make_monai_vit(config)
    keymap = vit3d_keymap(config)
    theirs = sum(p.numel() for name, p in monai_model.state_dict().items() if not keymap.ignored_reason(name))
    assert ours == theirs
    assert 85e6 < ours < 90e6  # ViT-B with a 2048-entry position table


def test_sincos_position_init_equals_monai_table():
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    config = ViT3DConfig(image_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=48, mlp_dim=96, num_layers=1,
                         num_heads=4, position_init="sincos")
    table = np.asarray(ViT3D(config, rngs=nnx.Rngs(0)).patch_embedding.position_embeddings[...])
    reference = build_sincos_position_embedding(list(config.grid), 48, spatial_dims=3).detach().numpy()[0]
    np.testing.assert_allclose(table, reference, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 6"):
        ViT3D(dataclasses.replace(config, hidden_size=64, num_heads=4), rngs=nnx.Rngs(0))
