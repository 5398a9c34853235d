"""Reading 3D volumes and M3D's preprocessing: min-max to [0, 1], crop to the foreground, trilinear resize.

Arrays are channel-first [C, D, H, W] float32, D being the slice (axial) axis, as M3D stores them.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m3d_jax import resize
from m3d_jax.errors import InputError


class VolumeError(InputError):
    """A volume file is missing, unreadable or has the wrong shape or values."""


@dataclasses.dataclass(frozen=True)
class Volume:
    array: np.ndarray  # [C, D, H, W] float32
    affine: np.ndarray | None  # 4×4 voxel → world transform of the [W, H, D] (RAS-canonical x, y, z) grid
    path: Path


def load_volume(path: str | os.PathLike) -> Volume:
    """Loads `.nii`/`.nii.gz` (reoriented to RAS canonical, returned as [1, D=z, H=y, W=x]) or a `.npy`
    in M3D's prepared layout ([1, D, H, W] or [D, H, W])."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: volume file not found")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            image = nib.as_closest_canonical(_read_nifti(path))
            _check_numeric(path, image.get_data_dtype())
            data = np.asarray(image.dataobj, dtype=np.float32)
        except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError,
                nib.spatialimages.HeaderDataError) as err:
            raise VolumeError(f"{path}: cannot read NIfTI volume ({type(err).__name__}: {err})") from None
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise VolumeError(f"{path}: expected a 3D NIfTI volume, got shape {data.shape}")
        array, affine = data.transpose(2, 1, 0)[None], image.affine
    elif name.endswith(".npy"):
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise VolumeError(f"{path}: cannot read .npy volume ({err})") from None
        _check_numeric(path, raw.dtype)
        array = raw.astype(np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise VolumeError(f"{path}: expected [C, D, H, W] or [D, H, W], got shape {array.shape}")
        affine = None
    else:
        raise VolumeError(f"{path}: unsupported volume format (use .nii, .nii.gz or .npy)")
    if not np.isfinite(array).all():
        raise VolumeError(f"{path}: volume contains NaN or Inf voxels")
    return Volume(array, affine, path)


def _read_nifti(path: Path):
    """nibabel image of a .nii / .nii.gz, gunzipped with ISA-L when installed (about 2× zlib)."""
    import nibabel as nib

    if not path.name.lower().endswith(".gz"):
        return nib.load(path)
    try:
        from isal.igzip import decompress
    except ImportError:
        from gzip import decompress
    raw = decompress(path.read_bytes())
    if len(raw) < 348:
        raise nib.filebasedimages.ImageFileError(f"{len(raw)} bytes after decompression: not a NIfTI file")
    is_nifti2 = int.from_bytes(raw[:4], "little") == 540 or int.from_bytes(raw[:4], "big") == 540
    return (nib.Nifti2Image if is_nifti2 else nib.Nifti1Image).from_bytes(raw)


def _check_numeric(path: Path, dtype: np.dtype) -> None:
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        raise VolumeError(f"{path}: unsupported voxel dtype {dtype} (need integer, float or bool)")


def window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT intensity windowing: clip to [level − width/2, level + width/2] (e.g. abdomen 40/400 HU)."""
    return np.clip(array, level - width / 2, level + width / 2).astype(np.float32)


def resize_nearest(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of [C, D, H, W] (torch `interpolate(mode="nearest")` index rule)."""
    index = [np.minimum((np.arange(new) * (old / new)).astype(np.int64), old - 1)
             for old, new in zip(mask.shape[1:], size)]
    return mask[(slice(None), *np.ix_(*index))]


def min_max(array: np.ndarray) -> np.ndarray:
    """Scales to [0, 1] over the whole volume; a constant volume becomes all zeros."""
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def foreground_box(array: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box (D, H, W slices) of voxels > 0 in any channel of [C, D, H, W] (MONAI CropForeground,
    margin 0); the whole volume when there is no foreground."""
    foreground = (array > 0).any(axis=0)
    if not foreground.any():
        return tuple(slice(0, n) for n in foreground.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(foreground.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop_foreground(array: np.ndarray) -> np.ndarray:
    """Crops [C, D, H, W] to `foreground_box`."""
    return array[(slice(None), *foreground_box(array))]


def resize_trilinear(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Trilinear resize of [C, D, H, W] to [C, *size] (torch trilinear, align_corners=False)."""
    return resize.resize_trilinear(array.astype(np.float32), size)


def preprocess(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """M3D's preparation of a raw volume: min-max to [0, 1] → crop foreground → trilinear resize."""
    return prepare(array, size)[0]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the model's input came from in the original [D, H, W] grid: the foreground box, resized."""

    original_shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    model_shape: tuple[int, int, int]

    def to_original(self, coords: np.ndarray) -> np.ndarray:
        """Model-grid voxel coordinates [..., 3] (D, H, W; continuous, centre convention) → original grid."""
        starts = np.array([b.start for b in self.box], np.float64)
        sizes = np.array([b.stop - b.start for b in self.box], np.float64)
        scale = sizes / np.array(self.model_shape, np.float64)
        return starts + (np.asarray(coords, np.float64) + 0.5) * scale - 0.5

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """A [D, H, W] mask on the model grid → the original grid (nearest neighbour, zero outside the box)."""
        sizes = [b.stop - b.start for b in self.box]
        index = [np.minimum(((np.arange(n) + 0.5) * m / n).astype(np.int64), m - 1)
                 for n, m in zip(sizes, self.model_shape)]
        out = np.zeros(self.original_shape, mask.dtype)
        out[self.box] = mask[np.ix_(*index)]
        return out


def prepare_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A mask [C, D, H, W] on the input grid → the model grid of `prepare`'s image (same crop, nearest)."""
    if tuple(mask.shape[1:]) != geometry.original_shape:
        raise VolumeError(f"mask shape {tuple(mask.shape[1:])} does not match the image's {geometry.original_shape}")
    return resize_nearest(mask[(slice(None), *geometry.box)], geometry.model_shape)


def prepare(array: np.ndarray, size: Sequence[int], window_level_width: tuple[float, float] | None = None
            ) -> tuple[np.ndarray, Geometry]:
    """`preprocess` plus the geometry needed to map boxes and masks back to the input volume; optional
    CT windowing (level, width) before the min-max scaling."""
    if window_level_width is not None:
        array = window(array, *window_level_width)
    scaled = min_max(array)
    box = foreground_box(scaled)
    image = resize_trilinear(scaled[(slice(None), *box)], size)
    return image, Geometry(tuple(array.shape[1:]), box, tuple(size))
