"""Conversions given bad inputs: an output folder that holds something (or is the input), a crash while
writing, safetensors headers with bad offsets, pickled code in a `.bin`, and a broken config.json. Each
is refused with one clear error, and nothing is written or lost."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from flax import nnx

from m3d_jax.convert import detect, jax_to_torch, load, save_jax, torch_to_jax
from m3d_jax.convert.decoder import decoder_keymap
from m3d_jax.convert.keymap import write_state
from m3d_jax.convert.torch_io import CheckpointReader, CheckpointReadError, OutputExistsError, atomic_output
from m3d_jax.errors import InputError
from m3d_jax.models.decoder import Decoder, DecoderConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = DecoderConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=64, eos_token_ids=(2,),
                           pad_token_id=0)
SMALL_SHARDS = 8_000  # bytes: the tiny decoder's conversions come out in several shards


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A tiny Llama in the PyTorch layout (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("released")
    save_jax(Decoder(TINY_LLAMA, rngs=nnx.Rngs(0)), root / "jax")
    jax_to_torch(root / "jax", root / "torch")
    return root / "torch"


@pytest.fixture
def source(released, tmp_path) -> Path:
    """A private copy of `released`, free to be damaged."""
    return Path(shutil.copytree(released, tmp_path / "src"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    """Temporary or set-aside copies of `path` left beside it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.")
                  or p.name.startswith(f"{path.stem}.tmp-"))


# 1. Output folders that hold something


def test_conversion_into_an_earlier_sharded_conversion_is_refused_and_overwrite_replaces_it_whole(source, tmp_path):
    dst = tmp_path / "dst"
    torch_to_jax(source, dst, max_shard_bytes=SMALL_SHARDS)
    assert (dst / "model.safetensors.index.json").is_file()
    before = _snapshot(dst)

    with pytest.raises(OutputExistsError, match=r"dst: already exists and is not empty.*--overwrite"):
        torch_to_jax(source, dst)
    assert _snapshot(dst) == before and _siblings(dst) == []

    torch_to_jax(source, dst, overwrite=True)  # one file now: the stale index and shards must be gone
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert _siblings(dst) == []
    assert load(dst).config == TINY_LLAMA


def test_reader_refuses_a_folder_whose_index_and_files_disagree(source, tmp_path):
    dst = tmp_path / "dst"
    torch_to_jax(source, dst, max_shard_bytes=SMALL_SHARDS)
    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    shutil.copy(dst / shards[0], dst / "model.safetensors")  # a single-file write landing beside the index
    with pytest.raises(CheckpointReadError, match=r"dst: model\.safetensors beside model\.safetensors\.index\.json, "
                                                  r"which does not list them"):
        CheckpointReader(dst)
    (dst / "model.safetensors").unlink()
    (dst / shards[-1]).unlink()
    with pytest.raises(CheckpointReadError, match=rf"index\.json: lists shard '{shards[-1]}', which is missing"):
        load(dst)


@pytest.mark.parametrize("where", ["same", "inside", "holding"])
def test_output_that_is_holds_or_lies_in_the_input_is_refused_even_with_overwrite(source, tmp_path, where):
    dst = {"same": source, "inside": source / "converted", "holding": tmp_path}[where]
    before = _snapshot(tmp_path)
    for convert in (torch_to_jax, jax_to_torch):
        with pytest.raises(OutputExistsError, match=r"the output (is the input|lies inside the input|holds the input)"):
            convert(source, dst, overwrite=True)
    assert _snapshot(tmp_path) == before and not (source / "converted").exists()


def test_a_crash_while_overwriting_leaves_the_old_folder_whole(source, tmp_path, monkeypatch):
    """kill -9 (simulated by an error from the third tensor read) during a re-conversion over a complete
    folder: the old folder stays as it was, and no partial output is left beside it."""
    dst = tmp_path / "dst"
    torch_to_jax(source, dst, max_shard_bytes=SMALL_SHARDS)
    before = _snapshot(dst)
    read, calls = CheckpointReader.read, []

    def crashing_read(self, key, index=None):
        calls.append(key)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return read(self, key, index)

    monkeypatch.setattr(CheckpointReader, "read", crashing_read)
    with pytest.raises(RuntimeError, match="killed"):
        torch_to_jax(source, dst, overwrite=True, max_shard_bytes=SMALL_SHARDS)
    assert _snapshot(dst) == before and _siblings(dst) == []
    monkeypatch.undo()
    assert load(dst).config == TINY_LLAMA


def test_writers_refuse_a_non_empty_folder_and_overwrite_drops_what_was_there(tmp_path):
    model = Decoder(TINY_LLAMA, rngs=nnx.Rngs(1))
    dst = tmp_path / "dst"
    dst.mkdir()  # an empty folder is fine
    save_jax(model, dst)
    (dst / "notes.txt").write_text("mine")
    before = _snapshot(dst)
    with pytest.raises(OutputExistsError, match="dst: already exists and is not empty"):
        save_jax(model, dst)
    with pytest.raises(OutputExistsError, match="dst: already exists and is not empty"):
        write_state(dst, decoder_keymap(TINY_LLAMA), nnx.state(model))
    assert _snapshot(dst) == before
    write_state(dst, decoder_keymap(TINY_LLAMA), nnx.state(model), overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors"] and _siblings(dst) == []


def test_a_single_file_output_is_replaced_only_whole(tmp_path):
    """The Med3DInsight `.pth` writer's path: an existing file is refused, and a failed overwrite keeps it."""
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=r"model\.pth: already exists"):
        with atomic_output(path, folder=False):
            pass
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(path, overwrite=True, folder=False) as tmp:
            assert tmp.suffix == ".pth"
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and _siblings(path) == []
    with atomic_output(path, overwrite=True, folder=False) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _siblings(path) == []


# 2. Safetensors headers


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


_GOOD = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}
_BAD_HEADERS = {
    "negative offset": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, 0, "'a'.*data_offsets"),
    "begin after end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, 16, "'a'.*end before"),
    "overlap": ({**_GOOD, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "'b'.*overlaps"),
    "gap": ({**_GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}, 32, "'b'.*leaves a gap"),
    "trailing bytes": (_GOOD, 40, "bytes after the last tensor \\('b'\\)"),
    "float offset": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}}, 16, "'a'.*data_offsets"),
    "bool dimension": ({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16, "'a'.*shape"),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "'a'.*shape"),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, 16, "'a'.*unsupported dtype"),
    "length mismatch": ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, 16, "'a'.*needs 20"),
}


@pytest.mark.parametrize("case", sorted(_BAD_HEADERS))
def test_safetensors_header_is_checked_as_strictly_as_the_safetensors_library(tmp_path, case):
    header, size, message = _BAD_HEADERS[case]
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, bytes(size))
    with pytest.raises(Exception):  # noqa: B017 — the official reader refuses it too
        safetensors.safe_open(str(path), "np")
    with pytest.raises(CheckpointReadError, match=rf"bad\.safetensors: .*{message}"):
        CheckpointReader(path)


def test_conversion_of_a_checkpoint_with_a_negative_offset_is_refused(source, tmp_path):
    """A LayerNorm weight at offset −256 would be read from the JSON header; the conversion stops instead."""
    path = source / "model.safetensors"
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    key = "model.norm.weight"
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin - 256, end - 256]
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    path.write_bytes(blob[:8] + encoded + blob[8 + header_len:])
    with pytest.raises(CheckpointReadError, match=r"model\.safetensors: tensor 'model\.norm\.weight' .*overlaps"):
        torch_to_jax(source, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and _siblings(tmp_path / "dst") == []


# 3. Messages


class _Payload:
    """Pickles as a call of json.loads (harmless if ever run, but code all the same)."""

    def __reduce__(self):
        return json.loads, ("1",)


def test_pickled_code_in_a_bin_is_refused_in_one_line_without_allowlist_advice(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, path)
    with pytest.raises(CheckpointReadError) as caught:
        CheckpointReader(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: holds code") and "json.loads" in message and "safetensors" in message
    assert "\n" not in message and "safe_globals" not in message and "weights_only" not in message


_BAD_CONFIGS = {
    "bad JSON": (lambda text: text[:-5], r"config\.json: not valid JSON"),
    "missing key": (lambda text: text.replace('"hidden_size"', '"hidden_sizes"'),
                    r"config\.json: missing key 'hidden_size'"),
    "wrong type": (lambda text: text.replace('"num_hidden_layers": 2', '"num_hidden_layers": "two"'),
                   r"config\.json: DecoderConfig\.num_layers \(key 'num_hidden_layers'\) must be an integer, "
                   r"got 'two'"),
    "bool for int": (lambda text: text.replace('"num_hidden_layers": 2', '"num_hidden_layers": true'),
                     r"config\.json: DecoderConfig\.num_layers .*must be an integer, got True"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_a_broken_config_json_is_named_with_its_problem(source, tmp_path, case):
    edit, message = _BAD_CONFIGS[case]
    config = source / "config.json"
    config.write_text(edit(config.read_text()))
    with pytest.raises(CheckpointReadError, match=message):
        detect(source)
    with pytest.raises(CheckpointReadError, match=message):
        torch_to_jax(source, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_load_names_a_broken_config_json(released, tmp_path):
    folder = Path(shutil.copytree(released.parent / "jax", tmp_path / "jax"))
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf | {"vocab_size": 64.0}))
    message = r"config\.json: DecoderConfig\.vocab_size \(key 'vocab_size'\) must be an integer, got 64\.0"
    with pytest.raises(CheckpointReadError, match=message):
        load(folder)


# 4. The command line


def test_convert_tool_prints_one_error_line_and_exits_2(source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # a fresh checkout too
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "torch2jax", str(source),
                             str(dst)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {dst}: already exists and is not empty"), result.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


def test_output_exists_error_is_an_input_error():
    assert issubclass(OutputExistsError, InputError) and issubclass(CheckpointReadError, InputError)
