"""Reading 3D volumes and M3D's preprocessing: min-max to [0, 1], crop to the foreground, trilinear resize.

Arrays are channel-first [C, D, H, W] float32, D being the slice (axial) axis, as M3D stores them.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m3d_jax import resize
from m3d_jax.errors import InputError, VolumeError

try:  # ISA-L's gunzip, about 2× zlib's speed, when installed
    from isal import igzip as gunzip
    from isal.isal_zlib import error as GunzipError
except ImportError:
    gunzip, GunzipError = gzip, zlib.error


MAX_VOXELS = 2**30
"""The most voxels (all channels together) `load_volume` reads: 1 Gi, 4 GiB as float32, past any CT or MR
(a 512 × 512 × 2000-slice CT is 0.5 Gi). It stops a lying header from asking for tens of GB. Raise it per
call with `load_volume(..., max_voxels=N)` or for a whole run with the environment variable below."""
MAX_VOXELS_ENV = "M3D_JAX_MAX_VOXELS"
_SLAB_VOXELS = 2**22  # voxels per float64 slab while applying a NIfTI scaling
_READ_CHUNK = 2**22  # bytes per read while gunzipping
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclasses.dataclass(frozen=True)
class Volume:
    array: np.ndarray  # [C, D, H, W] float32
    affine: np.ndarray | None  # 4×4 voxel → world transform of the [W, H, D] (RAS-canonical x, y, z) grid
    path: Path


def load_volume(path: str | os.PathLike, *, channels: int | None = None, max_voxels: int | None = None) -> Volume:
    """Loads `.nii`/`.nii.gz` or a DICOM series folder (m3d_jax.data.dicom), reoriented to RAS canonical and
    returned as [1, D=z, H=y, W=x], or a `.npy` in M3D's prepared layout ([1, D, H, W] or [D, H, W]), as
    float32.

    The header is checked before any voxel is read: its shape against the file's size (the gunzipped size
    for .nii.gz) and against `max_voxels` (default `voxel_limit()`), and its channel count against
    `channels` when given. Values must be finite and fit float32 (after a NIfTI's scl_slope/scl_inter).
    Every problem is a `VolumeError` naming the file.
    """
    path = Path(path)
    limit = voxel_limit(max_voxels)
    if path.is_dir():
        # pydicom costs ~0.3 s to import, which readers of NIfTI and .npy volumes need not pay.
        from m3d_jax.data.dicom import read_series

        _check_channels(path, 1, channels, (1,))
        data, affine = read_series(path, limit)
        return Volume(*_ras_canonical(path, data, affine), path)
    if not path.is_file():
        raise VolumeError(f"{path}: volume file not found")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        array, affine = _load_nifti(path, channels, limit)
    elif name.endswith(".npy"):
        array, affine = _load_npy(path, channels, limit), None
    else:
        raise VolumeError(f"{path}: unsupported volume format (use .nii, .nii.gz, .npy or a DICOM series folder)")
    return Volume(array, affine, path)


def voxel_limit(max_voxels: int | None = None) -> int:
    """The voxel cap in force: `max_voxels` when given, else $M3D_JAX_MAX_VOXELS, else `MAX_VOXELS`."""
    if max_voxels is not None:
        if max_voxels < 1:
            raise InputError(f"max_voxels must be a positive voxel count, got {max_voxels}")
        return int(max_voxels)
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return MAX_VOXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise InputError(f"{MAX_VOXELS_ENV}={text!r}: expected a positive whole number of voxels")
    return limit


def check_channels(volume: Volume, channels: int) -> None:
    """Raises a `VolumeError` unless the loaded volume has `channels` channels (for a volume read before
    the model that says how many it takes)."""
    _check_channels(volume.path, volume.array.shape[0], channels, volume.array.shape)


def _check_channels(path: Path, got: int, channels: int | None, shape: tuple[int, ...]) -> None:
    if channels is not None and got != channels:
        raise VolumeError(f"{path}: {got} channel{'s' if got != 1 else ''} (shape {tuple(shape)}), "
                          f"expected {channels}")


def _check_extent(path: Path, kind: str, shape: tuple[int, ...], dtype: np.dtype, offset: int,
                  available: int | None, limit: int) -> int:
    """Checks a header's shape against the bytes there are (when known) and the voxel cap, before any
    allocation; returns the bytes the header declares (data offset + voxels)."""
    if any(size < 1 for size in shape):
        raise VolumeError(f"{path}: the header declares shape {tuple(shape)}, which holds no voxels")
    voxels = math.prod(shape)
    needed = offset + voxels * dtype.itemsize
    if available is not None:
        _check_size(path, kind, shape, dtype, needed, available, "the file has")
    if voxels > limit:
        raise VolumeError(f"{path}: shape {tuple(shape)} is {voxels:,} voxels, over the limit of {limit:,}; if the "
                          f"volume is real, raise the limit with the environment variable {MAX_VOXELS_ENV}={voxels} "
                          f"(or load_volume(..., max_voxels={voxels}))")
    return needed


def _check_size(path: Path, kind: str, shape: tuple[int, ...], dtype: np.dtype, needed: int, available: int,
                has: str) -> None:
    if available < needed:
        raise VolumeError(f"{path}: cannot read {kind} volume (the header declares shape {tuple(shape)} of "
                          f"{dtype.name}, {needed:,} bytes with the header, but {has} {available:,}: truncated, "
                          "or a wrong header)")


def _load_npy(path: Path, channels: int | None, limit: int) -> np.ndarray:
    """[C, D, H, W] float32 of a .npy, its header checked before the data is mapped."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in _NPY_HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            shape, fortran_order, dtype = _NPY_HEADER_READERS[version](handle)
            offset = handle.tell()
    except (OSError, ValueError, EOFError) as err:
        raise VolumeError(f"{path}: cannot read .npy volume ({err})") from None
    _check_numeric(path, dtype)
    if len(shape) not in (3, 4):
        raise VolumeError(f"{path}: expected [C, D, H, W] or [D, H, W], got shape {shape}")
    _check_channels(path, shape[0] if len(shape) == 4 else 1, channels, shape)
    _check_extent(path, ".npy", shape, dtype, offset, path.stat().st_size, limit)
    try:
        raw = np.memmap(path, dtype, "r", offset, shape, order="F" if fortran_order else "C")
    except (OSError, ValueError) as err:
        raise VolumeError(f"{path}: cannot read .npy volume ({err})") from None
    array = _as_float32(path, raw)
    return array if array.ndim == 4 else array[None]


def _load_nifti(path: Path, channels: int | None, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """([1, D, H, W] float32 in RAS-canonical order, its affine) of a .nii / .nii.gz: the header is read
    and checked first; a .nii is memory-mapped, a .nii.gz gunzipped (ISA-L when installed, about 2× zlib)
    no further than the header's declared size."""
    # nibabel costs ~0.2 s to import, which workers that only read .npy volumes need not pay.
    import nibabel as nib

    gzipped = path.name.lower().endswith(".gz")
    read_errors = (OSError, EOFError, ValueError, zlib.error, GunzipError, nib.filebasedimages.ImageFileError,
                   nib.spatialimages.HeaderDataError)

    def unreadable(err: Exception) -> VolumeError:
        return VolumeError(f"{path}: cannot read NIfTI volume ({type(err).__name__}: {err})")

    try:
        with _open(path, gzipped) as handle:
            header = _nifti_header(handle.read(540))
            shape, dtype = header.get_data_shape(), header.get_data_dtype()
            offset = int(header.get_data_offset())
            slope, inter = header.get_slope_inter()
            affine = header.get_best_affine()
            _check_numeric(path, dtype)
            spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
            if len(spatial) != 3:
                raise VolumeError(f"{path}: expected a 3D NIfTI volume, got shape {shape}")
            _check_channels(path, 1, channels, (1, *spatial[::-1]))
            needed = _check_extent(path, "NIfTI", shape, dtype, offset, None if gzipped else path.stat().st_size,
                                   limit)
            if gzipped:
                handle.seek(0)
                buffer = _read_at_most(handle, needed)
                handle.read(1)  # at the stream's end this checks its CRC; trailing bytes are ignored
                _check_size(path, "NIfTI", shape, dtype, needed, len(buffer), "it gunzips to")
                raw = np.frombuffer(buffer, dtype, math.prod(spatial), offset).reshape(spatial, order="F")
            else:
                raw = np.memmap(path, dtype, "r", offset, spatial, order="F")
    except VolumeError:
        raise
    except read_errors as err:
        raise unreadable(err) from None
    data = _as_float32(path, raw.T, 1.0 if slope is None else slope, 0.0 if inter is None else inter)  # [z, y, x]
    return _ras_canonical(path, data, affine)


def _ras_canonical(path: Path, data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([1, z, y, x] in RAS-canonical voxel order, its affine) of `data` [k, j, i] whose `affine` maps
    voxel (i, j, k) to RAS millimetres."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation  # see _load_nifti

    try:
        orientation = io_orientation(affine)
    except ValueError as err:
        raise VolumeError(f"{path}: the affine does not give an orientation ({err})") from None
    if not np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):
        affine = affine @ inv_ornt_aff(orientation, data.shape[::-1])  # the (i, j, k) shape before reordering
        data = apply_orientation(data.T, orientation).T
    return data[None], affine


def _open(path: Path, gzipped: bool):
    return gunzip.open(path, "rb") if gzipped else open(path, "rb")


def _nifti_header(head: bytes):
    """The NIfTI-1 or NIfTI-2 header at the start of `head` (both byte orders)."""
    import nibabel as nib  # already imported by the caller

    if len(head) < 348:
        raise nib.filebasedimages.ImageFileError(f"{len(head)} bytes: too short for a NIfTI header")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    header_class = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header if 348 in sizes else None
    if header_class is None or len(head) < header_class.template_dtype.itemsize:
        raise nib.filebasedimages.ImageFileError("not a NIfTI-1 or NIfTI-2 file (no 348 or 540 sizeof_hdr)")
    header = header_class(head[:header_class.template_dtype.itemsize])
    magic = bytes(header["magic"].item()).rstrip(b"\0")
    if magic not in (b"n+1", b"n+2"):
        raise nib.filebasedimages.ImageFileError(f"magic {magic!r}: not a single-file NIfTI (n+1 or n+2)")
    return header


def _read_at_most(handle, size: int) -> bytearray:
    """Up to `size` bytes of a stream, grown as they arrive: a short stream costs what it holds, not what
    its header declared."""
    buffer = bytearray()
    while len(buffer) < size:
        chunk = handle.read(min(_READ_CHUNK, size - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


def _as_float32(path: Path, raw: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """`raw · slope + inter` as float32 (same shape), refusing NaN / Inf and values beyond float32. The range
    is checked on `raw` itself (min and max, no copy); the scaling runs in float64 slabs along axis 0."""
    raw = np.asarray(raw)  # a plain view of a memmap, so neither the results nor min / max are memmaps
    scaled = slope != 1.0 or inter != 0.0
    floating = np.issubdtype(raw.dtype, np.floating)
    if floating or scaled:
        low, high = raw.min(), raw.max()
        if floating and not (np.isfinite(low) and np.isfinite(high)):
            raise VolumeError(f"{path}: volume contains NaN or Inf voxels")
        extreme = max(float(low) * slope + inter, float(high) * slope + inter, key=abs)
        if not abs(extreme) <= _FLOAT32_MAX:
            scaling = f" after the header's scaling (scl_slope {slope:g}, scl_inter {inter:g})" if scaled else ""
            raise VolumeError(f"{path}: values up to {extreme:.3g}{scaling} overflow float32 "
                              f"(largest {_FLOAT32_MAX:.3g}); rescale the volume")
    if not scaled:
        return raw.astype(np.float32)
    out = np.empty(raw.shape, np.float32)
    rows = max(1, _SLAB_VOXELS // max(1, math.prod(raw.shape[1:])))
    for start in range(0, raw.shape[0], rows):
        out[start:start + rows] = raw[start:start + rows].astype(np.float64) * slope + inter
    return out


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
