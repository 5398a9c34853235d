"""Med3DInsight's pretraining checkpoint ↔ JAX: the full-size key count (363) and parameter count, a
bit-identical round trip through the reference's `.pth` state dict, the index buffers recomputed and
checked, clear errors for wrong keys, shapes and index modes, and loading only the backbone for
fine-tuning (with a re-initialised segmentation head when the class count changes)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from m3d_jax.convert.keymap import CheckpointMismatchError, torch_shapes
from m3d_jax.convert.med3dinsight import (
    export_med3dinsight, index_buffers, load_backbone, load_med3dinsight, med3dinsight_keymap,
)
from m3d_jax.models.med3dinsight import Med3DInsight, Med3DInsightConfig
from m3d_jax.models.nnformer import NnFormerConfig, relative_position_index
from m3d_jax.models.psat import PsatConfig

TINY = Med3DInsightConfig(
    backbone=NnFormerConfig(crop_size=(32, 32, 32), embed_dim=8, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4),
                            window_sizes=(4, 2, 4, 1), num_classes=3),
    psat=PsatConfig(hidden_size=64, num_heads=8, num_layers=2, num_queries=4, out_dim=16, slice_bins=16))


def _params(module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = Med3DInsight(TINY, rngs=nnx.Rngs(3))
    path = tmp_path_factory.mktemp("insight") / "latest_model.pth"
    assert export_med3dinsight(model, path) == len(torch.load(path, weights_only=True))  # the count it reports
    return model, path


def test_full_size_checkpoint_has_363_entries_and_the_published_parameter_count():
    config = Med3DInsightConfig()
    model = nnx.eval_shape(lambda: Med3DInsight(config, rngs=nnx.Rngs(0)))
    shapes = torch_shapes(med3dinsight_keymap(config), nnx.state(model))
    buffers = index_buffers(model.backbone)
    assert len(shapes) + len(buffers) == 363 and len(buffers) == 14
    assert sum(int(np.prod(s)) for s in shapes.values()) == 67_246_151
    # Spot checks against the research note's key list (torch layouts).
    assert shapes["model_down.layers.0.downsample.reduction.weight"] == (192, 96, 3, 3, 3)
    assert shapes["decoder.layers.2.Upsample.up.weight"] == (768, 384, 2, 2, 2)
    assert shapes["final.0.up.weight"] == (96, 4, 4, 4, 4) and shapes["res.up.weight"] == (96, 1, 4, 4, 4)
    assert shapes["decoder.layers.1.blocks.0.attn.kv.weight"] == (384, 192)
    assert shapes["psat.decoder.layers.5.self_attn.in_proj_weight"] == (2304, 768)
    assert shapes["model_down.layers.2.blocks.0.attn.relative_position_bias_table"] == (3375, 12)
    assert buffers["model_down.layers.2.blocks.1.attn.relative_position_index"].shape == (512, 512)


def test_round_trip_through_the_reference_state_dict_is_bit_identical(exported):
    model, path = exported
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    index = state["model_down.layers.0.blocks.1.attn.relative_position_index"]
    assert index.dtype == torch.int64
    np.testing.assert_array_equal(index.numpy(), relative_position_index(4, "reference"))
    assert state["model_down.patch_embed.proj1.conv1.weight"].shape == (4, 1, 3, 3, 3)  # (O, I, k, k, k)
    loaded, report = load_med3dinsight(path, TINY)
    assert len(report.ignored) == len(index_buffers(model.backbone))
    ours, theirs = _params(model), _params(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert np.array_equal(ours[key], theirs[key]), key
    # and the same outputs
    volumes = jax.random.uniform(jax.random.key(0), (1, 1, 32, 32, 32))
    plane, slices = np.array([1]), np.array([7])
    np.testing.assert_array_equal(np.asarray(model(volumes, plane, slices).embedding),
                                  np.asarray(loaded(volumes, plane, slices).embedding))


def test_index_buffers_from_the_other_mode_are_refused_with_the_fix(exported):
    _, path = exported
    corrected = dataclasses.replace(TINY, backbone=dataclasses.replace(TINY.backbone, relative_index="corrected"))
    with pytest.raises(ValueError, match="relative_index to 'reference'"):
        load_med3dinsight(path, corrected)


def test_wrong_keys_and_shapes_are_reported_by_name(exported, tmp_path):
    _, path = exported
    state = torch.load(path, weights_only=True)
    state.pop("psat.decoder.layers.1.norm2.weight")
    state["proj.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointMismatchError) as info:
        load_med3dinsight(bad, TINY)
    message = str(info.value)
    for expected in ("psat.decoder.layers.1.norm2.weight", "proj.weight", "extra.weight", "bad.pth"):
        assert expected in message


def test_backbone_for_fine_tuning_keeps_or_reinitialises_the_segmentation_head(exported):
    model, path = exported
    same = dataclasses.replace(TINY.backbone, reconstruction_head=False)
    backbone, report = load_backbone(path, same)
    ignored = {key for key, _ in report.ignored}
    assert "L" in ignored and "queries.weight" in ignored and "res.up.weight" in ignored
    ours = _params(model.backbone)
    for key, value in _params(backbone).items():
        assert np.array_equal(value, ours[key]), key
    five = dataclasses.replace(same, num_classes=5)
    backbone, report = load_backbone(path, five)
    assert "final.0.up.weight" in {key for key, _ in report.ignored}
    params = _params(backbone)
    assert params["final.kernel"].shape == (4, 4, 4, 8, 5)
    assert np.array_equal(params["model_down.layers.1.blocks.1.attn.qkv.kernel"],
                          ours["model_down.layers.1.blocks.1.attn.qkv.kernel"])


def test_convert_tool_reads_the_sizes_from_the_state_dict_and_round_trips(exported, tmp_path):
    from m3d_jax.convert import detect, jax_to_torch, load, torch_to_jax

    model, path = exported
    kind, config = detect(path)
    assert kind.name == "med3dinsight"
    expected = dataclasses.replace(TINY, backbone=dataclasses.replace(TINY.backbone, crop_size=(128, 128, 128),
                                                                      window_sizes=(4, 2, 2, 1)))
    assert config == expected  # windows as the 32³ crop shrank them; crop 128³ and 8 PSAT heads by default
    torch_to_jax(path, tmp_path / "jax")
    loaded = load(tmp_path / "jax")
    ours = _params(model)
    assert all(np.array_equal(value, ours[key]) for key, value in _params(loaded).items())
    jax_to_torch(tmp_path / "jax", tmp_path / "back.pth")
    original, back = torch.load(path, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert original.keys() == back.keys()
    assert all(torch.equal(original[key], back[key]) for key in original)


def test_unetr_backbone_pretrains_and_round_trips(tmp_path):
    from m3d_jax.models.med3dinsight import med3dinsight_loss
    from m3d_jax.models.unetr import UnetrConfig
    from m3d_jax.models.vit3d import ViT3DConfig

    vit = ViT3DConfig(image_size=(32, 32, 32), patch_size=(16, 16, 16), hidden_size=64, mlp_dim=96, num_layers=10,
                      num_heads=4, cls_token=False)
    config = Med3DInsightConfig(backbone=UnetrConfig(vit=vit, feature_size=8, out_channels=3), backbone_kind="unetr",
                                psat=TINY.psat, ot_iterations=50)
    model = Med3DInsight(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = dict(images=rng.random((4, 1, 32, 32, 32), np.float32), plane=np.array([0, 1, 2, 0]),
                 slice_index=np.array([3, 100, 255, 40]), image_embedding=rng.normal(size=(4, 16)).astype(np.float32),
                 text_embedding=rng.normal(size=(4, 16)).astype(np.float32))
    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(med3dinsight_loss, has_aux=True))(model, batch)
    assert np.isfinite(float(loss)) and float(metrics["reconstruction_mse"]) > 0
    assert float(np.abs(grads.backbone.vit.blocks.attn.qkv.kernel[...]).max()) > 0  # OT reaches the ViT
    assert float(np.abs(grads.res.kernel[...]).max()) > 0
    assert float(np.abs(grads.backbone.out.kernel[...]).max()) == 0  # the segmentation head is not in the loss
    path = tmp_path / "unetr.pth"
    export_med3dinsight(model, path)
    state = torch.load(path, weights_only=True)
    assert "backbone.vit.patch_embedding.position_embeddings" in state and "res.weight" in state
    loaded, _ = load_med3dinsight(path, config)
    assert all(np.array_equal(v, _params(model)[k]) for k, v in _params(loaded).items())
