"""Looking at a volume: CT window presets, the axial / coronal / sagittal planes of a RAS-canonical
[D=z, H=y, W=x] array oriented for display, their physical aspect from the voxel spacing, mask overlays,
box outlines and a mask's volume. Plain numpy, shared by `tools/infer.py`'s overlay PNG and the web app."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# (level, width) in HU; None = the slice's own full range.
WINDOWS: dict[str, tuple[float, float] | None] = {
    "soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "full range": None,
}
VIEWS = ("axial", "coronal", "sagittal")
MASK_COLOUR = (255, 64, 32)  # orange-red: visible on grey without hiding the anatomy at half opacity
BOX_COLOUR = (64, 224, 255)


def spacing_of(affine: np.ndarray | None) -> tuple[float, float, float]:
    """Voxel size in mm along (D=z, H=y, W=x) from a volume's affine (of the x, y, z grid); 1 mm without one."""
    if affine is None:
        return (1.0, 1.0, 1.0)
    x, y, z = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    return (float(z), float(y), float(x))


def window(plane: np.ndarray, level_width: tuple[float, float] | None) -> np.ndarray:
    """Intensities → uint8 grey: [level − width/2, level + width/2] mapped to 0…255 (clipped), or the plane's
    own min…max for None (a constant plane is black)."""
    plane = np.asarray(plane, np.float64)
    if level_width is None:
        low, high = float(plane.min()), float(plane.max())
    else:
        level, width = level_width
        low, high = level - width / 2, level + width / 2
    if high <= low:
        return np.zeros(plane.shape, np.uint8)
    return np.rint(np.clip((plane - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """One slice of [D, H, W] as displayed, first row at the top: axial (y, x) with anterior up, coronal
    (z, x) and sagittal (z, y) with superior up; x (RAS: towards the patient's right) grows to the right,
    the neurological convention."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    axis = VIEWS.index(view)
    if not 0 <= index < volume.shape[axis]:
        raise IndexError(f"{view} slice {index} outside 0..{volume.shape[axis] - 1}")
    return np.take(volume, index, axis=axis)[::-1]


def plane_spacing(spacing: Sequence[float], view: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a `plane` of a volume with voxel size (z, y, x) `spacing`."""
    z, y, x = spacing
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[view]


def to_physical_aspect(image: np.ndarray, pixel: tuple[float, float]) -> np.ndarray:
    """Repeats rows or columns (nearest neighbour) so a pixel is square in mm: the finer axis is kept and the
    coarser one stretched by the spacing ratio, rounded."""
    rows, cols = pixel
    finest = min(rows, cols)
    shape = (max(1, round(image.shape[0] * rows / finest)), max(1, round(image.shape[1] * cols / finest)))
    index = [np.minimum((np.arange(new) * old / new).astype(np.int64), old - 1)
             for old, new in zip(image.shape[:2], shape)]
    return image[np.ix_(*index)]


def overlay(grey: np.ndarray, mask: np.ndarray, opacity: float = 0.5,
            colour: tuple[int, int, int] = MASK_COLOUR) -> np.ndarray:
    """RGB uint8: `grey` (uint8 [h, w]) with `colour` blended at `opacity` where `mask` is set."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64)
    inside = np.asarray(mask, bool)
    rgb[inside] = (1.0 - opacity) * rgb[inside] + opacity * np.asarray(colour, np.float64)
    return np.rint(rgb).astype(np.uint8)


def draw_box(rgb: np.ndarray, top: int, left: int, bottom: int, right: int,
             colour: tuple[int, int, int] = BOX_COLOUR) -> np.ndarray:
    """A copy of `rgb` with the one-pixel outline of rows top…bottom, columns left…right (inclusive; parts
    outside the image are clipped away)."""
    out = rgb.copy()
    height, width = out.shape[:2]
    rows = slice(max(top, 0), min(bottom, height - 1) + 1)
    cols = slice(max(left, 0), min(right, width - 1) + 1)
    for row in (top, bottom):
        if 0 <= row < height:
            out[row, cols] = colour
    for col in (left, right):
        if 0 <= col < width:
            out[rows, col] = colour
    return out


def mask_volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """The mask's volume in mL: voxels set × voxel volume (mm³) / 1000."""
    return float(np.count_nonzero(mask) * np.prod(np.asarray(spacing, np.float64)) / 1000.0)


def mask_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The (D, H, W) slice indices through the middle of the mask's voxels (the volume's centre if empty)."""
    if not mask.any():
        return tuple(n // 2 for n in mask.shape)
    return tuple(int(np.mean(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]))
                 for axis in range(3))


def panels(volume: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float], *,
           level_width: tuple[float, float] | None = None, opacity: float = 0.5) -> np.ndarray:
    """The axial, coronal and sagittal planes through the mask's centre (or the volume's), windowed, the
    mask overlaid, each at its physical aspect, side by side on black: RGB uint8."""
    centre = mask_centre(mask) if mask is not None else tuple(n // 2 for n in volume.shape)
    images = []
    for axis, view in enumerate(VIEWS):
        grey = window(plane(volume, view, centre[axis]), level_width)
        shown = overlay(grey, plane(mask, view, centre[axis]) > 0, opacity) if mask is not None else \
            np.repeat(grey[..., None], 3, axis=-1)
        images.append(to_physical_aspect(shown, plane_spacing(spacing, view)))
    height = max(image.shape[0] for image in images)
    gap = np.zeros((height, 4, 3), np.uint8)
    padded = [np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0))) for image in images]
    return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)
