"""Answering questions about a volume with M3D-LaMed: prompt building, box parsing, and writing boxes and
masks back in the input volume's own grid."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from m3d_jax.data.volume import Geometry, Volume
from m3d_jax.render import panels

_BOX = re.compile(r"<bx_start>\s*\[([^\]]*)\]\s*<bx_end>")


def parse_boxes(text: str) -> list[np.ndarray]:
    """Boxes written as `<bx_start>[d0, h0, w0, d1, h1, w1]<bx_end>` (fractions of the model input, end
    inclusive); malformed ones are skipped."""
    boxes = []
    for match in _BOX.finditer(text):
        try:
            values = np.array([float(v) for v in match.group(1).split(",")])
        except ValueError:
            continue
        if values.shape == (6,):
            boxes.append(values)
    return boxes


def box_to_input(box: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """A normalised model-space box → (first, last) voxel indices (D, H, W, inclusive) in the input volume."""
    size = np.array(geometry.model_shape, np.float64)
    first = geometry.to_original(np.asarray(box[:3]) * size)
    last = geometry.to_original(np.asarray(box[3:]) * size)
    upper = np.array(geometry.original_shape) - 1
    return np.clip(np.round(first), 0, upper).astype(int), np.clip(np.round(last), 0, upper).astype(int)


def world_coordinates(volume: Volume, dhw: np.ndarray) -> np.ndarray | None:
    """(D, H, W) voxel indices of the canonical array → scanner (RAS, mm) coordinates, when known."""
    if volume.affine is None:
        return None
    xyz1 = np.array([dhw[2], dhw[1], dhw[0], 1.0])
    return (volume.affine @ xyz1)[:3]


def save_mask(mask: np.ndarray, volume: Volume, out_dir: str | os.PathLike, stem: str = "mask") -> Path:
    """Writes a [D, H, W] mask on the input grid: NIfTI with the input's (canonical) affine for NIfTI
    input, else `.npy` in M3D's [1, D, H, W] layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if volume.affine is not None:
        import nibabel as nib

        path = out_dir / f"{stem}.nii.gz"
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.uint8), volume.affine), path)
    else:
        path = out_dir / f"{stem}.npy"
        np.save(path, mask[None].astype(np.uint8))
    return path


def save_overlay(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike,
                 spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """PNG of the axial, coronal and sagittal planes of [D, H, W] `image` through the mask's centre, the mask
    overlaid, at the physical aspect of voxel size (z, y, x) `spacing` in mm (`render.panels`), enlarged by
    a whole factor to at least 256 pixels high."""
    import matplotlib.image

    picture = panels(image, mask, spacing)
    factor = max(1, -(-256 // picture.shape[0]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1))
    return Path(path)
