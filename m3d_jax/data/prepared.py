"""A record's volume (and mask) after M3D's deterministic preparation: min-max, crop to foreground, resize
to the model's size. Computed online from the raw files, or read back from prepared shards (`shards.py`),
where a record carries the result under "prepared"; either way the transforms see the same arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m3d_jax.data.volume import Geometry, load_volume, prepare, prepare_mask
from m3d_jax.errors import RecordError

LABEL_MAP_TASKS = ("segment",)  # records whose "mask" is a label map (class ids), not one class's mask


def load_record_mask(record: dict, image_shape: tuple[int, ...]) -> np.ndarray:
    """The record's binary mask [1, D, H, W] at the raw volume's size (its class value, or > 0)."""
    mask = load_volume(record["mask"]).array
    if mask.shape[1:] == (1, 1, 1) and not mask.any():  # M3D-Seg stores an absent class as [1,1,1,1] zeros
        return np.zeros((1, *image_shape[1:]), np.float32)
    if mask.shape[1:] != image_shape[1:]:
        raise RecordError(f"{record['mask']}: mask shape {mask.shape} does not match image {record['image']} "
                          f"shape {image_shape}")
    value = record.get("mask_value")
    return ((mask == value) if value is not None else (mask > 0)).astype(np.float32)[:1]


def load_label_map(record: dict, image_shape: tuple[int, ...]) -> np.ndarray:
    """The record's label map [1, D, H, W] (voxel value = class id) at the raw volume's size."""
    labels = load_volume(record["mask"]).array[:1]
    if labels.shape[1:] != image_shape[1:]:
        raise RecordError(f"{record['mask']}: label map shape {labels.shape[1:]} does not match image "
                          f"{record['image']} shape {image_shape[1:]}")
    return labels


def prepare_image(path, image_size: Sequence[int], window: tuple[float, float] | None = None,
                  in_channels: int | None = None) -> tuple[np.ndarray, Geometry, tuple[int, ...]]:
    """(image [C, *image_size] float32 in [0, 1], where it came from in the volume, the raw volume's shape)."""
    volume = load_volume(path, channels=in_channels).array
    image, geometry = prepare(volume, image_size, window)
    return image, geometry, volume.shape


def prepare_record_mask(record: dict, geometry: Geometry, volume_shape: tuple[int, ...]) -> np.ndarray | None:
    """The record's mask on the model grid of its image (one class's binary mask, or the label map for
    fine-tuning records, `LABEL_MAP_TASKS`); None for a record without one."""
    if "mask" not in record:
        return None
    load = load_label_map if record["task"] in LABEL_MAP_TASKS else load_record_mask
    return prepare_mask(load(record, volume_shape), geometry)


def prepare_record(record: dict, image_size: Sequence[int], window: tuple[float, float] | None = None,
                   in_channels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(image [C, *image_size] float32 in [0, 1], its mask on the same grid or None): the record's own
    prepared arrays when it comes from shards, else read and prepared from its files."""
    if "prepared" in record:
        prepared = record["prepared"]
        return prepared["image"], prepared.get("mask")
    image, geometry, shape = prepare_image(record["image"], image_size, window, in_channels)
    return image, prepare_record_mask(record, geometry, shape)
