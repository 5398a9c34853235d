"""What the app's viewers show, as RGB arrays: a windowed slice at its physical aspect, enlarged for the page,
with the mask, the answer's boxes and the other two views' positions marked; and Med-2E3's slice-score plot
with clicks on it mapped back to a slice. Plain numpy (and matplotlib for the plot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m3d_jax import render
from m3d_jax.inference import Answer, InputBox

DISPLAY_PIXELS = 320  # a viewer's image is enlarged by a whole factor to at least this many pixels on its long side
TICK_COLOUR = (255, 220, 0)
TICK_LENGTH = 3  # pixels of the slice (before enlarging) of the marks showing the other views' positions
PLOT_SIZE = (6.4, 2.2)  # inches at 100 dpi
PLOT_AXES = (0.09, 0.24, 0.89, 0.62)  # left, bottom, width, height as fractions of the figure
TOP_COLOUR, OTHER_COLOUR = "#ff4020", "#7a8a9a"


def plane_axes(view: str) -> tuple[int, int]:
    """The (row, column) volume axes (0 = D, 1 = H, 2 = W) of a `render.plane` of `view`."""
    return {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}[view]


def box_on_plane(box: InputBox, view: str, index: int, shape: Sequence[int]) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of `box` on slice `index` of `view` of a [D, H, W] volume of `shape`, in
    the plane's pixels (rows flipped as `render.plane` flips them); None when the slice misses the box."""
    axis = render.VIEWS.index(view)
    if not box.first[axis] <= index <= box.last[axis]:
        return None
    row_axis, col_axis = plane_axes(view)
    rows = shape[row_axis]
    return (rows - 1 - int(box.last[row_axis]), int(box.first[col_axis]),
            rows - 1 - int(box.first[row_axis]), int(box.last[col_axis]))


def enlargement(shape: Sequence[int], pixels: int = DISPLAY_PIXELS) -> int:
    """The whole factor that brings an image's long side to at least `pixels`."""
    return max(1, -(-pixels // max(shape[:2])))


def slice_image(volume: np.ndarray, view: str, index: int, spacing: Sequence[float], *,
                level_width: tuple[float, float] | None = None, mask: np.ndarray | None = None,
                opacity: float = 0.5, boxes: Sequence[InputBox] = (), position: Sequence[int] | None = None
                ) -> np.ndarray:
    """Slice `index` of `view` of [D, H, W] `volume` as shown: windowed, `mask` blended in at `opacity`,
    `boxes` outlined, ticks on the borders at the other views' slices of `position` (D, H, W), stretched to
    the physical aspect of voxel size (z, y, x) `spacing` and enlarged to `DISPLAY_PIXELS`: RGB uint8."""
    grey = render.window(render.plane(volume, view, index), level_width)
    if mask is not None and opacity > 0:
        rgb = render.overlay(grey, render.plane(mask, view, index) > 0, opacity)
    else:
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    for box in boxes:
        corners = box_on_plane(box, view, index, volume.shape)
        if corners is not None:
            rgb = render.draw_box(rgb, *corners)
    if position is not None:
        rgb = _ticks(rgb, view, position, volume.shape)
    shown = render.to_physical_aspect(rgb, render.plane_spacing(spacing, view))
    factor = enlargement(shown.shape)
    return np.repeat(np.repeat(shown, factor, axis=0), factor, axis=1)


def _ticks(rgb: np.ndarray, view: str, position: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Short marks on the borders where the other two views cut this one."""
    out = rgb.copy()
    row_axis, col_axis = plane_axes(view)
    row = shape[row_axis] - 1 - int(position[row_axis])
    col = int(position[col_axis])
    length = min(TICK_LENGTH, max(1, min(out.shape[:2]) // 8))
    out[row, :length] = out[row, -length:] = TICK_COLOUR
    out[:length, col] = out[-length:, col] = TICK_COLOUR
    return out


def pixel_to_voxel(view: str, index: int, xy: Sequence[int], shape: Sequence[int],
                   spacing: Sequence[float]) -> tuple[int, int, int]:
    """The (D, H, W) voxel under pixel (x, y) of the image `slice_image` shows for slice `index` of `view`."""
    row_axis, col_axis = plane_axes(view)
    rows, cols = shape[row_axis], shape[col_axis]
    pixel = render.plane_spacing(spacing, view)
    finest = min(pixel)
    shown = (max(1, round(rows * pixel[0] / finest)), max(1, round(cols * pixel[1] / finest)))
    factor = enlargement(shown)
    row = min(rows - 1, int(int(xy[1]) // factor * rows / shown[0]))
    col = min(cols - 1, int(int(xy[0]) // factor * cols / shown[1]))
    voxel = [0, 0, 0]
    voxel[render.VIEWS.index(view)] = index
    voxel[row_axis], voxel[col_axis] = rows - 1 - row, col
    return tuple(int(v) for v in voxel)


def score_plot(scores: np.ndarray, top: Sequence[int]) -> np.ndarray:
    """Bars of Med-2E3's per-slice scores, the `top` slices in colour and labelled, the score axis spanning the
    scores rather than starting at 0: RGB uint8 of `PLOT_SIZE`."""
    # matplotlib costs ~0.5 s to import; only Med-2E3 answers draw this plot
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure = plt.figure(figsize=PLOT_SIZE, dpi=100)
    try:
        axes = figure.add_axes(PLOT_AXES)
        colours = [TOP_COLOUR if j in set(top) else OTHER_COLOUR for j in range(len(scores))]
        axes.bar(np.arange(len(scores)), scores, width=0.8, color=colours)
        for j in top:
            axes.annotate(str(j), (j, scores[j]), ha="center", va="bottom", fontsize=7, color=TOP_COLOUR)
        axes.set_xlim(-0.5, len(scores) - 0.5)
        low, high = float(np.min(scores)), float(np.max(scores))
        if high - low > 1e-3 * high:  # near-uniform scores (a softmax over 32 slices) look equal from 0: zoom in
            axes.set_ylim(max(0.0, low - 0.2 * (high - low)), high + 0.35 * (high - low))
        axes.set_xlabel("model slice (click a bar to show it in the axial viewer)", fontsize=8)
        axes.set_ylabel("text-guided score", fontsize=8)
        axes.tick_params(labelsize=7)
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(figure)


def plot_slice(x: float, slices: int) -> int:
    """The model slice under horizontal pixel `x` of `score_plot`'s image (clamped to the bars)."""
    width = PLOT_SIZE[0] * 100
    fraction = (x / width - PLOT_AXES[0]) / PLOT_AXES[2]
    return int(np.clip(np.floor(fraction * slices), 0, slices - 1))


def input_slice(answer: Answer, model_slice: int) -> int:
    """The input (axial) slice in the middle of those Med-2E3's model slice `model_slice` was resampled from."""
    first, last = answer.slice_sources[model_slice]
    return (first + last) // 2


def plot_click_slice(answer: Answer, x: float) -> int:
    """The input (axial) slice a click at horizontal pixel `x` of the answer's score plot shows."""
    return input_slice(answer, plot_slice(x, len(answer.slice_scores)))


def answer_focus(answer: Answer, position: Sequence[int]) -> list[int]:
    """Where the viewers go (D, H, W) after `answer`: the mask's centre, else the first box's centre, else
    for Med-2E3 the top-scored slice (H, W kept), else `position`."""
    if answer.mask is not None and answer.mask.any():
        return [int(v) for v in render.mask_centre(answer.mask)]
    if answer.boxes:
        return [int(v) for v in (answer.boxes[0].first + answer.boxes[0].last) // 2]
    position = [int(v) for v in position]
    if answer.slice_scores is not None:
        position[0] = input_slice(answer, answer.top_slices()[0])
    return position
