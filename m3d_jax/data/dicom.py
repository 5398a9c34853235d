"""A DICOM series folder → the voxels and affine the NIfTI path would give (m3d_jax.data.volume turns both
into the same RAS-canonical [1, D, H, W] float32 volume).

A series is a folder of single-frame slices of one SeriesInstanceUID. Slices are ordered by their
ImagePositionPatient projected on the slice normal (the cross product of the ImageOrientationPatient row
and column directions), never by file name or InstanceNumber. Values are RescaleSlope · stored +
RescaleIntercept (Hounsfield units for CT). The affine maps voxel (column i, row j, slice k) to patient
coordinates, which DICOM gives in LPS: x and y are negated for RAS, as NIfTI and nibabel use.

Every problem is a VolumeError naming the folder or the file: a file that is not DICOM, several series in
one folder, slices of different size, orientation or pixel spacing, two slices at one position, a missing
slice (a gap that is a multiple of the slice step), uneven spacing, slices not stacked along the normal
(gantry tilt), multi-frame or colour images, and compressed pixel data no installed decoder can read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from m3d_jax.errors import VolumeError

_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
_ANGLE_TOLERANCE = 1e-4  # direction cosines that differ by less are the same orientation
_SPACING_TOLERANCE = 0.01  # relative: slice gaps and pixel spacings within 1% are equal


def read_series(folder: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(voxels [slices, rows, columns] float32, the 4×4 RAS affine of voxel (column, row, slice)) of the
    series in `folder`; more than `limit` voxels is refused before any pixel is read."""
    headers = _headers(folder)
    first_file, first = headers[0]
    rows, columns = int(first.Rows), int(first.Columns)
    row_dir, col_dir = (np.asarray(first.ImageOrientationPatient[:3], float),
                        np.asarray(first.ImageOrientationPatient[3:], float))
    normal = np.cross(row_dir, col_dir)
    spacing = np.asarray(first.PixelSpacing, float)  # (between rows, between columns), mm
    for path, ds in headers[1:]:
        _same(folder, first_file, path, "size (Rows × Columns)", (rows, columns), (int(ds.Rows), int(ds.Columns)))
        _same(folder, first_file, path, "ImageOrientationPatient", first.ImageOrientationPatient,
              ds.ImageOrientationPatient, _ANGLE_TOLERANCE)
        _same(folder, first_file, path, "PixelSpacing", spacing, ds.PixelSpacing, _SPACING_TOLERANCE * spacing.min())
    positions = np.asarray([ds.ImagePositionPatient for _, ds in headers], float)
    order = np.argsort(positions @ normal, kind="stable")
    headers, positions = [headers[i] for i in order], positions[order]
    step = _slice_step(folder, headers, positions @ normal)
    origin = positions[0]
    drift = np.abs(positions - (origin + np.arange(len(headers))[:, None] * step * normal)).max()
    if drift > _SPACING_TOLERANCE * max(step, spacing.min()) + 1e-3:
        raise VolumeError(f"{folder}: the slices are not stacked along their normal (off by up to {drift:.3g} mm: "
                          "a gantry-tilted or sheared series); resample it to an orthogonal grid first")
    voxels = rows * columns * len(headers)
    if voxels > limit:
        raise VolumeError(f"{folder}: {len(headers)} slices of {rows}×{columns} = {voxels} voxels exceed the "
                          f"limit of {limit} (raise it with M3D_JAX_MAX_VOXELS or max_voxels=)")
    data = np.empty((len(headers), rows, columns), np.float32)
    for k, (path, _) in enumerate(headers):
        data[k] = _slice_values(path)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # column index i runs along the row direction
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
    if not files:
        raise VolumeError(f"{folder}: an empty folder, not a DICOM series (or a volume file)")
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            raise VolumeError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); a series folder "
                              "holds only the slices of one series") from None
        missing = [tag for tag in _REQUIRED if tag not in ds]
        if missing:
            raise VolumeError(f"{path}: no {', '.join(missing)}; the slice cannot be placed in space")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise VolumeError(f"{path}: a multi-frame image ({ds.NumberOfFrames} frames); only series of "
                              "single-frame slices are read")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(f"{path}: {ds.SamplesPerPixel} samples per pixel (colour); expected greyscale")
        headers.append((path, ds))
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise VolumeError(f"{folder}: {len(series)} series mixed in one folder (SeriesInstanceUID "
                          f"{', '.join(sorted(series)[:3])}{', ...' if len(series) > 3 else ''}); put each in its own "
                          "folder")
    return headers


def _same(folder: Path, first: Path, path: Path, what: str, expected, got, tolerance: float = 0.0) -> None:
    if np.abs(np.asarray(expected, float) - np.asarray(got, float)).max() > tolerance:
        raise VolumeError(f"{folder}: slices disagree on {what}: {first.name} has {list(np.asarray(expected))}, "
                          f"{path.name} has {list(np.asarray(got))}")


def _slice_step(folder: Path, headers: list, along_normal: np.ndarray) -> float:
    """The one gap between neighbouring slices (mm); a zero, missing or uneven gap is an error."""
    if len(headers) < 2:
        thickness = headers[0][1].get("SliceThickness")
        return float(thickness) if thickness else 1.0
    gaps = np.diff(along_normal)
    step = float(np.median(gaps))
    for index, gap in enumerate(gaps):
        here, there = headers[index][0].name, headers[index + 1][0].name
        if gap <= _SPACING_TOLERANCE * step:
            raise VolumeError(f"{folder}: {here} and {there} lie at the same position ({along_normal[index]:.4g} mm "
                              "along the slice normal); a duplicate slice or two series")
        if abs(gap - step) > _SPACING_TOLERANCE * step:
            multiple = gap / step
            if abs(multiple - round(multiple)) <= _SPACING_TOLERANCE * multiple and round(multiple) >= 2:
                raise VolumeError(f"{folder}: {round(multiple) - 1} slice(s) missing between {here} and {there} "
                                  f"(a gap of {gap:.4g} mm where the series steps {step:.4g} mm)")
            raise VolumeError(f"{folder}: uneven slice spacing: {gap:.4g} mm between {here} and {there}, "
                              f"{step:.4g} mm elsewhere")
    return step


def _slice_values(path: Path) -> np.ndarray:
    """One slice's stored values through its rescale, as float32 [rows, columns]."""
    ds = pydicom.dcmread(path)
    syntax = getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    try:
        stored = ds.pixel_array
    except Exception as err:  # noqa: BLE001 — pydicom's decoders raise many types; each becomes one message
        if syntax is not None and syntax.is_compressed:
            raise VolumeError(f"{path}: compressed pixel data ({syntax.name}, {syntax}) that no installed decoder "
                              f"could read ({type(err).__name__}: {err}); install pylibjpeg with its plugins or "
                              "GDCM, or decompress the series (e.g. gdcmconv --raw)") from None
        raise VolumeError(f"{path}: cannot read the pixel data ({type(err).__name__}: {err})") from None
    if stored.ndim != 2:
        raise VolumeError(f"{path}: pixel data of shape {stored.shape}; expected one greyscale slice")
    slope, intercept = float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = stored.astype(np.float64) * slope + intercept
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > np.finfo(np.float32).max:
        raise VolumeError(f"{path}: values do not fit float32 after RescaleSlope {slope} / Intercept {intercept}")
    return values.astype(np.float32)
