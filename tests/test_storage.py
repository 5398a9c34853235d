"""Workdirs and init checkpoints on URLs (`m3d_jax.storage`), on fsspec's in-memory filesystem: the run's side
files end up in the workdir and a resumed run appends to its metrics; a remote checkpoint is read from a
complete local copy, the same model as the local folder; a missing URL is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem
from ml_collections import ConfigDict

from m3d_jax.convert import load, save_jax
from m3d_jax.errors import InputError
from m3d_jax.models.decoder import Decoder, DecoderConfig
from m3d_jax.storage import CACHE_ENV, RunFolder, StorageError, local_copy
from m3d_jax.train.metrics import MetricWriter
from m3d_jax.train.trainer import local_init

TINY_LLAMA = DecoderConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=64, eos_token_ids=(2,),
                           pad_token_id=0)


@pytest.fixture
def memory(tmp_path, monkeypatch) -> MemoryFileSystem:
    """The in-memory filesystem, emptied afterwards; the cache and the working directory in `tmp_path`."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/bucket"):
        fs.rm("/bucket", recursive=True)


def _put_folder(fs: MemoryFileSystem, folder: Path, remote: str) -> None:
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            fs.put_file(str(file), f"{remote}/{file.relative_to(folder).as_posix()}")


def test_metric_writer_on_a_url_writes_there_and_a_resumed_run_appends(memory, tmp_path):
    for step in (1, 2):  # the second writer is a resumed run
        folder = RunFolder("memory://bucket/run")
        writer = MetricWriter(folder, total_steps=2, initial_step=step - 1, progress=False)
        writer.write(step, {"loss": 1.0 / step})
        rows = memory.cat_file("/bucket/run/metrics.jsonl").decode().splitlines()
        assert [json.loads(row)["step"] for row in rows] == list(range(1, step + 1))  # uploaded at the write
        writer.close()
        folder.close()
        assert not Path(folder.staging).exists()
    assert any("tfevents" in name for name in memory.find("/bucket/run/tensorboard"))
    assert list((tmp_path / "cwd").iterdir()) == []  # no local folder named "memory:"


def test_local_workdir_is_written_in_place(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    writer = MetricWriter(folder, total_steps=1, progress=False)
    writer.write(1, {"loss": 0.5})
    writer.close()
    folder.upload("metrics.jsonl")  # nothing to send
    folder.close()
    assert folder.staging == str(tmp_path / "run")
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_progress_off_a_terminal_is_one_line_per_logged_step(tmp_path, capsys):
    folder = RunFolder(str(tmp_path / "run"))
    writer = MetricWriter(folder, total_steps=300, progress=True)  # pytest's captured stderr is not a terminal
    for step in range(1, 301):
        writer.advance()
        if step % 100 == 0:
            writer.write(step, {"loss": 1.0 / step, "lr": 1e-3, "step_time_s": 0.25, "ignored": 7.0})
    writer.write(300, {"lm_loss": 0.1}, prefix="eval")
    writer.close()
    folder.close()
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    expected = [f"step {s}/300: loss {1.0 / s:.4g}, lr 0.001, 0.25 s/step" for s in (100, 200, 300)]
    assert captured.out.splitlines() == expected


def test_export_folder_is_uploaded_with_the_same_files(memory):
    folder = RunFolder("memory://bucket/run")
    export = Path(folder.local("pytorch"))
    files = {"config.json": b"{}", "model.safetensors": bytes(range(256)), "llm/config.json": b'{"a": 1}'}
    for name, data in files.items():
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_bytes(data)
    folder.upload("pytorch")
    folder.close()
    uploaded = {name.removeprefix("/bucket/run/pytorch/"): memory.cat_file(name)
                for name in memory.find("/bucket/run/pytorch")}
    assert uploaded == files


def test_init_url_loads_from_its_cached_copy_as_the_local_folder(memory, tmp_path):
    save_jax(Decoder(TINY_LLAMA, rngs=nnx.Rngs(0)), tmp_path / "jax")
    _put_folder(memory, tmp_path / "jax", "/bucket/ckpt/jax")
    init = local_init(ConfigDict({"language_model": "memory://bucket/ckpt/jax/", "vision_layout": "m3d_clip_vision"}))
    copy = Path(init.language_model)
    assert copy.is_relative_to(tmp_path / "cache" / "init") and copy.name == "jax"
    assert init.vision_layout == "m3d_clip_vision"  # not a path: kept
    expected = nnx.state(load(tmp_path / "jax", expect="decoder"))
    loaded = nnx.state(load(init.language_model, expect="decoder"))
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
    memory.rm("/bucket/ckpt", recursive=True)
    assert local_copy("memory://bucket/ckpt/jax/") == str(copy)  # copied once, then read from the cache


def test_interrupted_copy_is_not_taken_for_a_complete_one(memory, tmp_path, monkeypatch):
    memory.pipe("/bucket/ckpt/model.pth", b"weights")

    def broken(*args, **kwargs):
        raise OSError("connection reset")

    with monkeypatch.context() as patch:
        patch.setattr(MemoryFileSystem, "get_file", broken)
        with pytest.raises(StorageError, match="memory://bucket/ckpt/model.pth: cannot copy it"):
            local_copy("memory://bucket/ckpt/model.pth")
    copy = Path(local_copy("memory://bucket/ckpt/model.pth"))
    assert copy.name == "model.pth" and copy.read_bytes() == b"weights"
    assert [p.name for p in copy.parent.iterdir()] == ["model.pth"]  # no partial copy left beside it


def test_missing_init_url_is_a_one_line_error(memory):
    with pytest.raises(InputError) as error:
        local_copy("memory://bucket/nothing/here")
    assert isinstance(error.value, StorageError)
    assert str(error.value) == "memory://bucket/nothing/here: no such file or folder"
