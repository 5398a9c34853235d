"""torch ↔ JAX conversion of the 3D ViT layouts, and the clear errors for bad checkpoints."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from conftest import TINY, make_monai_vit, prefixed_state_dict
from m3d_jax.convert import CheckpointMismatchError, CheckpointReadError, CheckpointReader, write_state
from m3d_jax.convert.vit3d import VIT3D_PREFIXES, load_vit3d, vit3d_keymap

LAYOUTS = {
    "m3d_clip_vision": TINY,
    "lamed_vision_tower": TINY,
    "segvol_image_encoder": dataclasses.replace(TINY, cls_token=False),
}


def _released_state_dict(layout: str) -> dict[str, torch.Tensor]:
    """A state dict in the released layout: MONAI's keys under the layout's prefix, MONAI-only extras removed."""
    config = LAYOUTS[layout]
    keymap = vit3d_keymap(config, layout)
    state = prefixed_state_dict(make_monai_vit(config), VIT3D_PREFIXES[layout])
    return {k: v for k, v in state.items() if not keymap.ignored_reason(k)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_round_trip_is_bit_identical(layout, file_format, tmp_path):
    original = _released_state_dict(layout)
    source = tmp_path / f"original.{file_format}"
    if file_format == "bin":
        torch.save(original, source)
    else:
        save_file(original, str(source))
    model, report = load_vit3d(source, LAYOUTS[layout], layout)
    assert report.converted == len(original) and report.ignored == []

    write_state(tmp_path / "export", vit3d_keymap(LAYOUTS[layout], layout), nnx.state(model))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


def test_monai_extras_are_listed_as_ignored_and_export_loads_into_monai(tmp_path):
    monai_model = make_monai_vit(TINY)
    save_file(prefixed_state_dict(monai_model), str(tmp_path / "monai.safetensors"))
    model, report = load_vit3d(tmp_path / "monai.safetensors", TINY)
    ignored = {key for key, _ in report.ignored}
    assert ignored == {"classification_head.0.weight", "classification_head.0.bias"} | {
        f"blocks.{i}.norm_cross_attn.{p}" for i in range(TINY.num_layers) for p in ("weight", "bias")
    }
    write_state(tmp_path / "export", vit3d_keymap(TINY), nnx.state(model), max_shard_bytes=100_000)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded

    fresh = make_monai_vit(TINY, seed=1)
    exported = {key: torch.from_numpy(np.array(CheckpointReader(tmp_path / "export").read(key)))
                for key in index["weight_map"]}
    result = fresh.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == ignored  # only MONAI's own extras, which M3D's ViT does not have
    for key, tensor in exported.items():
        assert torch.equal(fresh.state_dict()[key], monai_model.state_dict()[key]), key


def test_bf16_checkpoint_loads_into_fp32_params(tmp_path):
    original = {k: v.to(torch.bfloat16) for k, v in _released_state_dict("m3d_clip_vision").items()}
    save_file(original, str(tmp_path / "bf16.safetensors"))
    model, _ = load_vit3d(tmp_path / "bf16.safetensors", TINY)
    kernel = np.asarray(model.blocks.mlp.linear1.kernel[...])
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel[1], original["blocks.1.mlp.linear1.weight"].float().numpy().T)
    write_state(tmp_path / "export", vit3d_keymap(TINY), nnx.state(model), dtype="bfloat16")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def _write(tmp_path, state, name="model.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_missing_key_is_reported(tmp_path):
    state = _released_state_dict("m3d_clip_vision")
    del state["blocks.1.attn.qkv.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: blocks\.1\.attn\.qkv\.weight"):
        load_vit3d(_write(tmp_path, state), TINY)


def test_unexpected_key_is_reported(tmp_path):
    state = _released_state_dict("m3d_clip_vision")
    state["blocks.0.attn.extra_bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected keys: blocks\.0\.attn\.extra_bias"):
        load_vit3d(_write(tmp_path, state), TINY)


def test_wrong_shape_names_key_file_and_shapes(tmp_path):
    state = _released_state_dict("m3d_clip_vision")
    state["norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointMismatchError, match=r"norm\.weight \(file model\.safetensors: \[65\], expected \[64\]\)"):
        load_vit3d(_write(tmp_path, state), TINY)


def test_wrong_dtype_is_reported(tmp_path):
    state = _released_state_dict("m3d_clip_vision")
    state["norm.bias"] = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(CheckpointMismatchError, match=r"wrong dtype: norm\.bias \(file model\.safetensors: int64"):
        load_vit3d(_write(tmp_path, state), TINY)


def test_all_problems_are_reported_together(tmp_path):
    state = _released_state_dict("m3d_clip_vision")
    del state["cls_token"]
    state["norm.weight"] = torch.ones(65)
    state["stray"] = torch.ones(1)
    with pytest.raises(CheckpointMismatchError) as error:
        load_vit3d(_write(tmp_path, state), TINY)
    message = str(error.value)
    assert "missing keys: cls_token" in message and "unexpected keys: stray" in message
    assert "wrong shape: norm.weight" in message and "model.safetensors" in message


def test_wrong_layout_prefix_is_reported_as_missing_and_unexpected(tmp_path):
    path = _write(tmp_path, _released_state_dict("m3d_clip_vision"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: model\.vision_tower\.vision_tower\."):
        load_vit3d(path, TINY, "lamed_vision_tower")


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    path = _write(tmp_path, _released_state_dict("m3d_clip_vision"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: truncated file: tensor '.*' ends at byte"):
        load_vit3d(path, TINY)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointReadError, match="truncated safetensors file"):
        load_vit3d(path, TINY)


def test_truncated_bin_names_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_released_state_dict("m3d_clip_vision"), path)
    path.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(CheckpointReadError, match=r"pytorch_model\.bin: cannot read as a PyTorch checkpoint"):
        load_vit3d(tmp_path, TINY)


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    index = {"metadata": {}, "weight_map": {"norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointReadError, match=r"lists shard 'model-00002-of-00002\.safetensors', which is missing"):
        CheckpointReader(tmp_path)


def test_missing_checkpoint_path_is_reported(tmp_path):
    with pytest.raises(CheckpointReadError, match="no such checkpoint file or folder"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointReadError, match="expected one checkpoint file or an index"):
        CheckpointReader(tmp_path)


def test_corrupt_header_and_index_without_tensor_are_named(tmp_path):
    import struct

    header = b'[1, 2, 3]'
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointReadError, match=r"a\.safetensors: corrupt safetensors header"):
        CheckpointReader(tmp_path / "a.safetensors")
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"x": torch.ones(2)}, str(folder / "part.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"y": "part.safetensors"}}))
    with pytest.raises(CheckpointReadError, match=r"part\.safetensors: the index lists tensor 'y'"):
        CheckpointReader(folder).read("y")
