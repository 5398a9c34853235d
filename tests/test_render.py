"""Rendering for people (m3d_jax/render.py) against hand-made arrays: CT windows, plane orientation,
physical aspect, mask overlay, box outlines, mask volume."""

from __future__ import annotations

import numpy as np
import pytest

from m3d_jax import render


def test_windows_map_hounsfield_units_to_grey():
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    assert render.window(hu, render.WINDOWS["soft tissue"]).tolist() == [[0, 0, 128, 255, 255]]
    # bone: 400 ± 900 → −500…1300; −160 → 340/1800·255 = 48.2, 40 → 76.5 (to even: 76), 240 → 104.8
    assert render.window(hu, render.WINDOWS["bone"]).tolist() == [[0, 48, 76, 105, 255]]
    # the plane's own range −1000…3000: −160 → 840/4000·255 = 53.6, 40 → 66.3, 240 → 79.1
    assert render.window(hu, None).tolist() == [[0, 54, 66, 79, 255]]
    assert render.window(np.full((2, 2), 7.0), None).tolist() == [[0, 0], [0, 0]]


def test_planes_are_oriented_with_anterior_and_superior_up():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [z, y, x]
    np.testing.assert_array_equal(render.plane(volume, "axial", 1), volume[1][::-1])
    assert render.plane(volume, "axial", 1)[0].tolist() == [20, 21, 22, 23]  # top row: the most anterior y
    assert render.plane(volume, "coronal", 2)[0].tolist() == [20, 21, 22, 23]  # top row: the most superior z
    assert render.plane(volume, "sagittal", 3)[:, 0].tolist() == [15, 3]  # superior first, y = 0 on the left
    with pytest.raises(IndexError, match="sagittal slice 4 outside 0..3"):
        render.plane(volume, "sagittal", 4)


def test_spacing_and_physical_aspect():
    affine = np.diag([0.5, 0.5, 2.0, 1.0])  # x, y 0.5 mm; z 2 mm
    spacing = render.spacing_of(affine)
    assert spacing == (2.0, 0.5, 0.5) and render.spacing_of(None) == (1.0, 1.0, 1.0)
    assert render.plane_spacing(spacing, "coronal") == (2.0, 0.5)
    image = np.array([[1, 2], [3, 4]])
    stretched = render.to_physical_aspect(image, (2.0, 0.5))  # a row is 4× as tall as a column is wide
    assert stretched.shape == (8, 2)
    assert stretched[:, 0].tolist() == [1, 1, 1, 1, 3, 3, 3, 3]


def test_overlay_blends_only_inside_the_mask():
    grey = np.array([[100, 100], [0, 255]], np.uint8)
    mask = np.array([[True, False], [False, True]])
    rgb = render.overlay(grey, mask, opacity=0.5, colour=(255, 0, 0))
    assert rgb[0, 0].tolist() == [178, 50, 50]  # 0.5·100 + 0.5·(255, 0, 0), rounded
    assert rgb[0, 1].tolist() == [100, 100, 100] and rgb[1, 0].tolist() == [0, 0, 0]
    assert rgb[1, 1].tolist() == [255, 128, 128]
    assert render.overlay(grey, mask, opacity=0.0)[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="opacity"):
        render.overlay(grey, mask, opacity=1.5)


def test_box_outline_is_one_pixel_and_clipped():
    rgb = np.zeros((5, 6, 3), np.uint8)
    boxed = render.draw_box(rgb, 1, 1, 3, 4, colour=(9, 9, 9))
    outline = boxed[..., 0] == 9
    expected = np.zeros((5, 6), bool)
    expected[1, 1:5] = expected[3, 1:5] = expected[1:4, 1] = expected[1:4, 4] = True
    np.testing.assert_array_equal(outline, expected)
    assert not rgb.any()  # the input is left alone
    clipped = render.draw_box(rgb, -2, 3, 2, 10, colour=(9, 9, 9))[..., 0] == 9
    # top row and right column fall outside: the bottom row (3 pixels) and left column (3) share a corner
    assert clipped[2, 3:].all() and clipped[:3, 3].all() and clipped.sum() == 5


def test_mask_volume_and_centre():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:4, 5:10, 0:10] = True  # 100 voxels
    assert render.mask_volume_ml(mask, (2.0, 0.5, 0.5)) == pytest.approx(100 * 0.5 / 1000)
    assert render.mask_centre(mask) == (2, 7, 4)
    assert render.mask_centre(np.zeros((4, 6, 8), bool)) == (2, 3, 4)


def test_panels_put_three_views_side_by_side_at_physical_aspect():
    volume = np.zeros((4, 8, 8), np.float32)
    mask = np.zeros_like(volume, bool)
    mask[1:3, 2:4, 2:4] = True
    volume[mask] = 100.0
    image = render.panels(volume, mask, (2.0, 1.0, 1.0))
    # axial 8×8, coronal and sagittal 4 rows of 2 mm → 8×8; two 4-pixel gaps
    assert image.shape == (8, 8 + 4 + 8 + 4 + 8, 3) and image.dtype == np.uint8
    assert (image[..., 1] < image[..., 0]).sum() > 0  # the mask shows in the overlay colour
