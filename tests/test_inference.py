"""Boxes and masks from the model grid back to the input volume; the infer CLI end to end."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from m3d_jax.data.volume import load_volume, prepare
from m3d_jax import render
from m3d_jax.inference import box_to_input, parse_boxes, save_mask, save_overlay, world_coordinates


def _nifti_with_blob(tmp_path):
    data = np.zeros((60, 50, 40), np.float32)  # (x, y, z) on disk
    data[10:50, 5:45, 4:36] = 100.0  # foreground (body)
    data[20:30, 15:25, 10:20] = 400.0  # a bright blob
    affine = np.diag([-1.5, 1.5, 2.0, 1.0])  # LPS-like x flip, anisotropic voxels
    affine[:3, 3] = [30.0, -20.0, 5.0]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct.nii.gz")
    return load_volume(tmp_path / "ct.nii.gz")


def test_parse_boxes_reads_well_formed_boxes_only():
    text = "It is here <bx_start>[0.1, 0.25, 0.5, 0.3, 0.75, 1.0]<bx_end> and <bx_start>[1, 2]<bx_end> <bx_start>[a]<bx_end>"
    boxes = parse_boxes(text)
    assert len(boxes) == 1 and np.allclose(boxes[0], [0.1, 0.25, 0.5, 0.3, 0.75, 1.0])


def test_box_and_mask_map_back_to_the_input_grid(tmp_path):
    volume = _nifti_with_blob(tmp_path)
    image, geometry = prepare(volume.array, (16, 32, 32))
    assert image.shape == (1, 16, 32, 32)
    # The bright blob in the model grid, as a box the model would write (first voxel / size, last / size).
    blob = np.argwhere(image[0] > 0.9)
    first, last = blob.min(0), blob.max(0)
    box = np.concatenate([first, last]) / np.array([16, 32, 32, 16, 32, 32])
    start, end = box_to_input(box, geometry)
    blob_in_input = np.argwhere(volume.array[0] > 300)
    assert np.all(np.abs(start - blob_in_input.min(0)) <= 2) and np.all(np.abs(end - blob_in_input.max(0)) <= 2)
    world = world_coordinates(volume, start)
    assert world is not None and np.allclose(volume.affine @ np.r_[start[::-1], 1], np.r_[world, 1])

    mask = geometry.mask_to_original((image[0] > 0.9).astype(np.uint8))
    assert mask.shape == volume.array.shape[1:]
    overlap = (mask > 0) & (volume.array[0] > 300)
    assert overlap.sum() / (volume.array[0] > 300).sum() > 0.8
    path = save_mask(mask, volume, tmp_path / "out")
    written = nib.load(path)
    np.testing.assert_array_equal(written.affine, volume.affine)
    reloaded = load_volume(path).array[0]
    np.testing.assert_array_equal(reloaded > 0, mask > 0)
    png = save_overlay(volume.array[0], mask, tmp_path / "out" / "overlay.png", render.spacing_of(volume.affine))
    import matplotlib.image

    picture = (matplotlib.image.imread(png)[..., :3] * 255).round()
    assert picture.shape[0] >= 256 and picture.shape[1] > 2 * picture.shape[0]  # three views side by side
    assert ((picture[..., 0] > picture[..., 1] + 20)).sum() > 100  # the mask, in the overlay colour


def test_infer_cli_answers(tmp_path):
    from test_lamed import _save_released, tiny_torch_lamed
    from test_tools import _run
    from conftest import word_tokenizer

    folder = tmp_path / "released"
    _save_released(tiny_torch_lamed("phi3", segmentation=True), folder)
    word_tokenizer(folder, 256)
    volume = np.random.default_rng(0).random((1, 20, 70, 70)).astype(np.float32)
    np.save(tmp_path / "ct.npy", volume)
    out = _run("tools/infer.py", f"--ckpt={folder}", f"--volume={tmp_path / 'ct.npy'}", "--question= w5 w9",
               "--max_new_tokens=6", f"--out_dir={tmp_path / 'out'}")
    assert "Q:  w5 w9\nA: " in out, out
