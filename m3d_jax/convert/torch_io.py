"""Streaming I/O for PyTorch checkpoints: read safetensors (single or sharded with an index) and
`*.bin` files one tensor at a time, and write sharded safetensors + index that PyTorch loads.

Safetensors files are parsed here (a JSON header, then raw little-endian bytes; each tensor or slice is
read with one positioned read), which gives bfloat16 through ml_dtypes, exact errors for truncated files,
and a resident memory of one tensor at a time. `.bin` files go through
`torch.load(weights_only=True, mmap=True)`, never plain pickle.

Writers never leave a half-written output under its own name: they write into a temporary sibling and
rename it into place when complete (`atomic_output`), and refuse an output that already holds something
unless asked to replace it whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from m3d_jax.errors import InputError, first_line

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_ST_TO_NUMPY = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NUMPY_TO_ST = {v: k for k, v in _ST_TO_NUMPY.items()}


class CheckpointReadError(InputError):
    """A checkpoint file is missing, truncated, corrupt or not in a supported format."""


class OutputExistsError(InputError):
    """A conversion's output path already holds something (and overwriting was not asked for), or it is,
    holds or lies inside the conversion's input."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path


class _SafetensorsFile:
    """One .safetensors file: header parsed once, tensors read with positioned reads."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointReadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise CheckpointReadError(
                    f"{path}: truncated safetensors file: header claims {header_len} bytes, file has {size}"
                )
            try:
                header = json.loads(handle.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointReadError(f"{path}: corrupt safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointReadError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
        for key, entry in header.items():
            self.entries[key] = _header_entry(path, key, entry)
        _check_layout(path, self.entries, self.data_start, size)

    def read(self, key: str, index: int | slice | None = None) -> np.ndarray:
        """The tensor, or its slice `index` (an int or a step-1 slice) along axis 0, read into fresh memory
        (no mapping is kept, so a process converting a checkpoint holds only the tensor at hand)."""
        shape, dtype, begin, end = self.entries[key]
        if index is not None:
            row = (end - begin) // shape[0]
            if isinstance(index, slice):
                start, stop, _ = index.indices(shape[0])
                begin, end, shape = begin + start * row, begin + stop * row, (stop - start, *shape[1:])
            else:
                begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        buffer = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            if handle.readinto(memoryview(buffer)) != buffer.size:
                raise CheckpointReadError(f"{self.path}: could not read tensor {key!r} (file changed or truncated)")
        return buffer.view(dtype.newbyteorder("<")).reshape(shape)


def _header_entry(path: Path, key: str, entry: object) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """One tensor's (shape, dtype, begin, end) from a safetensors header, checked as the safetensors
    library checks it."""
    def bad(problem: str) -> CheckpointReadError:
        return CheckpointReadError(f"{path}: tensor {key!r} {problem}; the file is corrupt or was not written by "
                                   "a safetensors writer, so re-export it")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("has a corrupt header entry (it needs dtype, shape and data_offsets)")
    if entry["dtype"] not in _ST_TO_NUMPY:
        raise CheckpointReadError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']!r}; supported: "
                                  f"{', '.join(_ST_TO_NUMPY)}")
    dtype = _ST_TO_NUMPY[entry["dtype"]]
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise bad(f"has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise bad(f"has data_offsets {offsets} that end before they begin")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise bad(f"holds {end - begin} bytes, but its shape {shape} of {entry['dtype']} needs "
                  f"{math.prod(shape) * dtype.itemsize}")
    return tuple(shape), dtype, begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, entries: dict[str, tuple], data_start: int, size: int) -> None:
    """The tensors' byte ranges, sorted, must tile the data section exactly: from byte 0, no gap, no
    overlap (two tensors sharing bytes would alias), ending at the end of the file."""
    position, previous = 0, None
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            where = f"after tensor {previous!r}" if previous is not None else "at the start of the data"
            problem = "overlaps" if begin < position else "leaves a gap"
            raise CheckpointReadError(f"{path}: tensor {key!r} (data_offsets [{begin}, {end}]) {problem} {where} "
                                      f"(expected to begin at {position}); the file is corrupt, re-export it")
        position, previous = end, key
    if data_start + position > size:
        raise CheckpointReadError(f"{path}: truncated file: tensor {previous!r} ends at byte "
                                  f"{data_start + position}, file has {size}")
    if data_start + position < size:
        after = f"the last tensor ({previous!r})" if previous is not None else "the header"
        raise CheckpointReadError(f"{path}: the {size - data_start - position} bytes after {after} belong to no "
                                  "tensor; the file is corrupt, re-export it")


class _BinFile:
    """One PyTorch pickle checkpoint, loaded lazily with mmap and weights_only."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise CheckpointReadError(f"{path}: reading .bin checkpoints needs PyTorch (pip install torch)") from None
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err):
                raise CheckpointReadError(f"{path}: cannot read as a PyTorch checkpoint ({first_line(err)}); "
                                          "the file may be truncated or corrupt") from None
            # torch's own message suggests allow-listing the payload's callable: never repeat that advice.
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointReadError(
                f"{path}: holds code, not only tensors (a pickled callable or class{what}), so it will not be "
                "loaded; convert it to safetensors with tooling you trust, or get a .safetensors copy"
            ) from None
        except Exception as err:  # torch raises RuntimeError/EOFError/... for bad files
            raise CheckpointReadError(
                f"{path}: cannot read as a PyTorch checkpoint ({first_line(err)}); "
                "the file may be truncated, corrupt, or saved in the legacy non-zip format"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointReadError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
        self.tensors = state
        self.entries = {k: (tuple(v.shape), _torch_to_numpy_dtype(v.dtype, path, k)) for k, v in state.items()}

    def read(self, key: str, index: int | slice | None = None) -> np.ndarray:
        import torch

        tensor = self.tensors[key] if index is None else self.tensors[key][index]
        tensor = tensor.contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _torch_to_numpy_dtype(torch_dtype, path: Path, key: str) -> np.dtype:
    name = str(torch_dtype).removeprefix("torch.")
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise CheckpointReadError(f"{path}: tensor {key!r} has unsupported dtype {torch_dtype}") from None


def _open(path: Path):
    if not path.is_file():
        raise CheckpointReadError(f"{path}: checkpoint file not found")
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _BinFile(path)


class CheckpointReader:
    """Key-level access to a PyTorch checkpoint: a file, or a folder holding a sharded index, a single
    `model.safetensors` / `pytorch_model.bin`, or exactly one `.safetensors`/`.bin` file.

    Files are opened when first needed and tensors are read one at a time (positioned reads, no mapping).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files: dict[Path, object] = {}
        self._key_to_file: dict[str, Path] = self._discover()

    def _discover(self) -> dict[str, Path]:
        path = self.path
        if path.is_file():
            return dict.fromkeys(self._file(path).entries, path)
        if not path.is_dir():
            raise CheckpointReadError(f"{path}: no such checkpoint file or folder")
        for index_name, suffix in ((SAFETENSORS_INDEX, ".safetensors"), (BIN_INDEX, ".bin")):
            index_path = path / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CheckpointReadError(f"{index_path}: not a valid checkpoint index ({err})") from None
                listed = set(weight_map.values())
                missing = sorted(shard for shard in listed if not (path / shard).is_file())
                if missing:
                    names = ", ".join(map(repr, missing))
                    which = f"shard {names}, which is" if len(missing) == 1 else f"shards {names}, which are"
                    raise CheckpointReadError(f"{index_path}: lists {which} missing; copy the files in or convert "
                                              "the checkpoint again")
                # A weight file the index does not list means two checkpoints share the folder (e.g. a
                # single-file conversion written over a sharded one): which tensors are current is unknown.
                unlisted = sorted(p.name for p in path.iterdir()
                                  if p.suffix in (".safetensors", suffix) and p.name not in listed)
                if unlisted:
                    raise CheckpointReadError(
                        f"{path}: {', '.join(unlisted)} beside {index_name}, which does not list them; the folder "
                        "mixes two checkpoints, so convert again into an empty folder")
                return {key: path / shard for key, shard in weight_map.items()}
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        safetensors = [p.name for p in candidates if p.suffix == ".safetensors"]
        if len(safetensors) > 1:
            raise CheckpointReadError(f"{path}: {', '.join(safetensors)} without an index ({SAFETENSORS_INDEX}); "
                                      "cannot tell which tensors are current, so convert again into an empty folder")
        preferred = [p for p in candidates if p.name in ("model.safetensors", "pytorch_model.bin")]
        chosen = preferred[:1] or candidates
        if len(chosen) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise CheckpointReadError(
                f"{path}: expected one checkpoint file or an index ({SAFETENSORS_INDEX}, {BIN_INDEX}); found: {found}"
            )
        return dict.fromkeys(self._file(chosen[0]).entries, chosen[0])

    def _file(self, path: Path):
        if path not in self._files:
            self._files[path] = _open(path)
        return self._files[path]

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def info(self, key: str) -> TensorInfo:
        file = self._key_to_file[key]
        entries = self._file(file).entries
        if key not in entries:
            raise CheckpointReadError(f"{file}: the index lists tensor {key!r}, but the file does not contain it")
        shape, dtype = entries[key][:2]
        return TensorInfo(tuple(shape), dtype, file)

    def read(self, key: str, index: int | slice | None = None) -> np.ndarray:
        """The tensor `key` (or its slice `index` along axis 0), read one at a time."""
        if key not in self._key_to_file:
            raise CheckpointReadError(f"{self.path}: no tensor {key!r}")
        file = self._file(self._key_to_file[key])
        if key not in file.entries:
            raise CheckpointReadError(f"{file.path}: the index lists tensor {key!r}, but the file does not contain it")
        return file.read(key, index)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_safetensors(path: Path, specs: Sequence[TensorSpec], produce: Callable[[str], np.ndarray]) -> None:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.key] = {
            "dtype": _NUMPY_TO_ST[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data section
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_tensors(tmp, header_bytes, specs, produce)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_tensors(tmp: Path, header_bytes: bytes, specs: Sequence[TensorSpec],
                   produce: Callable[[str], np.ndarray]) -> None:
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for spec in specs:
            produced = produce(spec.key)
            chunks = [produced] if isinstance(produced, np.ndarray) else produced
            written = 0
            for chunk in chunks:  # an array, or consecutive slices along axis 0 (e.g. one layer each)
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != spec.dtype or chunk.shape[1:] != spec.shape[1:]:
                    raise ValueError(f"{spec.key}: produced {chunk.dtype}{list(chunk.shape)} for planned "
                                     f"{spec.dtype}{list(spec.shape)}")
                handle.write(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes())
                written += chunk.nbytes
            if written != spec.nbytes:
                raise ValueError(f"{spec.key}: produced {written} bytes, planned {spec.nbytes}")


def check_output(dst: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
                 ) -> None:
    """Refuses an output path that holds something (a file, or a folder with entries) unless `overwrite`,
    and, even with `overwrite`, one that is an input, lies inside one or holds one (replacing it would
    destroy the input). Call it before a long conversion; the writers call it again."""
    dst_resolved = Path(dst).resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if dst_resolved == source_resolved:
            raise OutputExistsError(f"{dst}: the output is the input; write to another path")
        if dst_resolved.is_relative_to(source_resolved):
            raise OutputExistsError(f"{dst}: the output lies inside the input {source}; write to another path")
        if source_resolved.is_relative_to(dst_resolved):
            raise OutputExistsError(f"{dst}: the output holds the input {source}, which writing it would "
                                    "replace; write to another path")
    if not overwrite and _occupied(Path(dst)):
        raise OutputExistsError(f"{dst}: already exists and is not empty; choose a new path, or pass "
                                "overwrite=True (--overwrite) to replace it whole")


def _occupied(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False, folder: bool = True) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `dst` (`<dst>.tmp-<pid>`, a folder, or a file path keeping
    `dst`'s suffix when `folder` is False) to write the whole output into; when the block ends without an
    error it takes `dst`'s place, else it is deleted and `dst` is left as it was.

    A `dst` that holds something is refused (`OutputExistsError`) unless `overwrite`; then the old one is
    replaced whole, never merged: renamed aside, the new one renamed in, the old one deleted. A crash
    (even kill -9) leaves `dst` complete, either old or new; a crash between the two renames leaves no
    `dst` and both versions beside it, named `.tmp-<pid>` (new) and `.old-<pid>` (old).
    """
    check_output(dst, overwrite=overwrite)
    dst = Path(os.path.abspath(dst))  # "." and "x/.." get a name; a symlink itself is replaced, not its target
    pid = os.getpid()
    tmp = (dst.with_name(f"{dst.name}.tmp-{pid}") if folder
           else dst.with_name(f"{dst.stem}.tmp-{pid}{dst.suffix}"))
    _remove(tmp)  # left by a killed process that had this pid
    dst.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        check_output(dst, overwrite=overwrite)  # something may have appeared there meanwhile
        _swap_in(tmp, dst, dst.with_name(f"{dst.name}.old-{pid}"))
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(new: Path, dst: Path, aside: Path) -> None:
    if not (dst.exists() or dst.is_symlink()) or (dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir())):
        if dst.is_dir() and not new.is_dir():
            dst.rmdir()
        os.replace(new, dst)  # a rename: atomic, and an empty folder is replaced as well
        return
    if new.is_file() and dst.is_file() and not dst.is_symlink():
        os.replace(new, dst)
        return
    _remove(aside)
    os.rename(dst, aside)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_checkpoint(
    out_dir: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int = 5 * 2**30,
    config: dict | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes tensors as HF-style safetensors: `model.safetensors`, or `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json` when they exceed `max_shard_bytes`; `config.json` if given.

    `produce(key)` is called once per tensor, in order, and returns the array or an iterable of its
    consecutive slices along axis 0, so at most one tensor (or one slice) is in memory at a time.
    The folder is written beside `out_dir` and renamed into place when complete (see `atomic_output`):
    an `out_dir` that holds something is refused unless `overwrite`, which replaces it whole.
    """
    out_dir = Path(out_dir)
    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in specs:
        if shards[-1] and shard_bytes + spec.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += spec.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        if len(shards) > 1:
            weight_map = {spec.key: name for name, shard in zip(names, shards) for spec in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        for name, shard in zip(names, shards):
            _write_safetensors(tmp / name, shard, produce)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    written = ([out_dir / SAFETENSORS_INDEX] if len(shards) > 1 else []) + [out_dir / name for name in names]
    return written + ([out_dir / "config.json"] if config is not None else [])
