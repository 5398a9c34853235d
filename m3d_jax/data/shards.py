"""Prepared shards: a data mixture's records after M3D's deterministic preparation (`prepared.py`), stored
as ArrayRecord files that Grain reads at random (`grain.ArrayRecordDataSource`), with a manifest.

Layout of a shard set (local, `gs://` read natively by array_record, or any fsspec URL, copied to a local
cache on first use):

  manifest.json                              settings, counts per source, checksums, skipped records
  images/shard-00000-of-00040.array_record   each distinct volume once, prepared (M3D-VQA asks ~5 questions
                                             per volume), with its foreground box and raw shape
  <source folder>/shard-00000-of-00008.array_record   the source's records: fields, image index, mask
  <...>.json                                 beside each shard, written once it is complete (resume marker)

A record is b"M3DR" + uint32 header length + a JSON header (its fields and the layout of its arrays) + the
array bytes. Images are stored as uint8 (x·255 rounded: error ≤ 1/510) or bfloat16 (error ≤ 2⁻⁹ in
[0, 1]); masks bit-packed, label maps as integers. Records keep their source's order, so record i of a
shard source is record i of the raw source, and a pipeline reads the same samples from both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import grain.python as grain
import ml_dtypes
import numpy as np

from m3d_jax.errors import ConfigError, InputError
from m3d_jax.storage import cache_root, filesystem, is_remote

MAGIC = b"M3DR"
FORMAT = "m3d-jax prepared shards"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE = ("uint8", "bfloat16")
WRITER_OPTIONS = "group_size:1,zstd:1"  # group size 1: Grain reads single records at random
PATH_FIELDS = ("image", "mask", "slices")


class ShardError(InputError):
    """A shard set is missing, incomplete or was prepared with other settings; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The preparation a shard set holds: what every pipeline reading it must ask for."""

    image_size: tuple[int, int, int]
    window: tuple[float, float] | None = None
    in_channels: int = 1
    storage: str = "uint8"

    def __post_init__(self):
        if self.storage not in STORAGE:
            raise ConfigError(f"shard storage must be one of {STORAGE}, got {self.storage!r}")

    def to_json(self) -> dict:
        return {"image_size": list(self.image_size), "window": list(self.window) if self.window else None,
                "in_channels": self.in_channels, "storage": self.storage}

    @classmethod
    def from_json(cls, data: dict) -> Settings:
        window = data.get("window")
        return cls(tuple(data["image_size"]), tuple(window) if window else None, int(data["in_channels"]),
                   data["storage"])


def source_key(entry, default_split: str) -> str:
    """The identity of a config's source entry in a manifest: kind, path and split (its default when empty)."""
    return f"{entry['kind']}:{entry['path']}:{entry.get('split', '') or default_split}"


def source_folder(position: int, key: str) -> str:
    """A folder name for a source: its position in the preparation, and its key made path-safe."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key).strip("_")
    return f"{position:02d}-{safe}"[:120]


# Record encoding.

def _store_image(image: np.ndarray, storage: str) -> tuple[np.ndarray, str]:
    if storage == "uint8":
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), "unit_uint8"
    return image.astype(ml_dtypes.bfloat16), "bfloat16"


def _store_mask(mask: np.ndarray, label_map: bool) -> tuple[np.ndarray, str]:
    if not label_map:
        return np.packbits(mask.astype(bool).ravel()), "bits"
    labels = np.rint(mask)
    dtype = np.uint8 if labels.min() >= 0 and labels.max() < 256 else np.int32
    return labels.astype(dtype), "labels"


def _encode(fields: dict, arrays: dict[str, tuple[np.ndarray, str, tuple[int, ...]]]) -> bytes:
    layout, blobs = [], []
    for name, (array, packing, shape) in arrays.items():
        blob = np.ascontiguousarray(array).tobytes()
        layout.append({"name": name, "dtype": array.dtype.name, "shape": list(shape), "packing": packing,
                       "bytes": len(blob)})
        blobs.append(blob)
    header = json.dumps({"fields": fields, "arrays": layout}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blobs])


def encode_image(path, image: np.ndarray, geometry, volume_shape: tuple[int, ...], storage: str) -> bytes:
    """An image record: the prepared image, its source path, and where it came from in the volume (so masks
    can be prepared against it without reading the volume again)."""
    fields = {"image": str(path), "box": [[b.start, b.stop] for b in geometry.box],
              "volume_shape": list(volume_shape)}
    return _encode(fields, {"image": (*_store_image(image, storage), image.shape)})


def encode_record(record: dict, image_index: int, mask: np.ndarray | None, *, label_map: bool) -> bytes:
    """A source record: its fields (paths as strings, for messages), the index of its image in the image
    shards, and its prepared mask, if any."""
    fields = {key: (str(value) if key in PATH_FIELDS else value) for key, value in record.items()}
    arrays = {} if mask is None else {"mask": (*_store_mask(mask, label_map), mask.shape)}
    return _encode(dict(fields, image_index=image_index), arrays)


def decode(data: bytes, where: str = "shard record") -> tuple[dict, dict[str, np.ndarray]]:
    """A shard record → (its fields, its arrays as float32)."""
    if data[:4] != MAGIC:
        raise ShardError(f"{where}: not an m3d-jax prepared record")
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + length])
    offset = 8 + length
    arrays = {}
    for item in header["arrays"]:
        blob = data[offset:offset + item["bytes"]]
        offset += item["bytes"]
        shape = tuple(item["shape"])
        if item["packing"] == "bits":
            array = np.unpackbits(np.frombuffer(blob, np.uint8), count=int(np.prod(shape))).reshape(shape)
        else:
            dtype = ml_dtypes.bfloat16 if item["dtype"] == "bfloat16" else np.dtype(item["dtype"])
            array = np.frombuffer(blob, dtype).reshape(shape)
        array = array.astype(np.float32)
        if item["packing"] == "unit_uint8":
            array *= np.float32(1.0 / 255.0)
        arrays[item["name"]] = array
    return header["fields"], arrays


# Reading.

def read_manifest(root: str) -> dict:
    """The manifest of the shard set at `root` (a folder or URL)."""
    where = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        fs, path = filesystem(where)
        with fs.open(path, "r") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise ShardError(f"{where}: no manifest; prepare the shards with tools/prepare_data.py (or finish an "
                         "interrupted run by rerunning it)") from None
    except (OSError, ValueError) as error:
        raise ShardError(f"{where}: cannot read the manifest ({type(error).__name__}: {error})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{where}: not an m3d-jax shard manifest of version {VERSION}")
    return manifest


class ShardSource:
    """One source of a shard set, a random-access Grain source: record i with its image (from the set's
    image shards) and mask under "prepared", as `prepared.prepare_record` takes them."""

    def __init__(self, root: str, entry: dict, key: str, files: Sequence[str], image_files: Sequence[str]):
        self.description = f"{root}:{key}"
        self._records = grain.ArrayRecordDataSource(list(files))
        self._images = grain.ArrayRecordDataSource(list(image_files))
        if len(self._records) != entry["written"]:
            raise ShardError(f"{self.description}: the shards hold {len(self._records)} records, the manifest "
                             f"says {entry['written']}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        fields, arrays = decode(self._records[index], f"{self.description} record {index}")
        image_index = fields.pop("image_index")
        _, image = decode(self._images[image_index], f"{self.description} image {image_index}")
        return {**fields, "prepared": {**image, **arrays}}

    def __repr__(self) -> str:
        return f"ShardSource({self.description})"


def open_source(root: str, entry, default_split: str, settings: Settings, cache: str | None = None
                ) -> ShardSource:
    """The shard source of a config's source `entry` in the set at `root`, checked against the `settings`
    the pipeline needs. Local folders and gs:// are read in place; other URLs (s3://, ...) are copied shard by
    shard into `cache` (default `$M3D_JAX_CACHE/shards`), verified by checksum, on first use."""
    manifest = read_manifest(root)
    saved = Settings.from_json(manifest["settings"])
    needed = dict(image_size=tuple(settings.image_size), window=tuple(settings.window) if settings.window else None,
                  in_channels=settings.in_channels)
    have = dict(image_size=saved.image_size, window=saved.window, in_channels=saved.in_channels)
    if needed != have:
        differ = ", ".join(f"{key} {have[key]} (pipeline: {needed[key]})" for key in needed if needed[key] != have[key])
        raise ShardError(f"{root}: these shards were prepared with {differ}; prepare them again with the "
                         "pipeline's settings or point data.shards elsewhere")
    key = source_key(entry, default_split)
    found = [source for source in manifest["sources"] if source["key"] == key]
    if not found:
        listed = [s["key"] for s in manifest["sources"]]
        raise ShardError(f"{root}: the manifest has no source {key} (it has {listed}); prepare it with "
                         "tools/prepare_data.py")
    source = found[0]
    files = [_local_copy(root, shard, cache) for shard in source["shards"]]
    image_files = [_local_copy(root, shard, cache) for shard in manifest["images"]["shards"]]
    return ShardSource(root, source, key, files, image_files)


def _local_copy(root: str, shard: dict, cache: str | None) -> str:
    url = f"{root.rstrip('/')}/{shard['file']}"
    if not is_remote(root) or root.startswith("gs://"):
        return url.removeprefix("file://")
    local = Path(cache or cache_root() / "shards") / hashlib.sha256(root.encode()).hexdigest()[:16] / shard["file"]
    if local.exists() and sha256(str(local)) == shard["sha256"]:
        return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(url)
    partial = local.with_suffix(".partial")
    with fs.open(path, "rb") as source, open(partial, "wb") as target:
        shutil.copyfileobj(source, target, 16 << 20)
    if sha256(str(partial)) != shard["sha256"]:
        partial.unlink()
        raise ShardError(f"{url}: checksum differs from the manifest's (a damaged or replaced shard)")
    os.replace(partial, local)
    return str(local)


def sha256(path: str) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()
