"""Volume reading and M3D preprocessing against torch/MONAI, and the errors for bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3d_jax.data.volume import VolumeError, crop_foreground, load_volume, min_max, preprocess, resize_trilinear


@pytest.mark.parametrize("size", [(32, 64, 64), (8, 20, 70), (37, 50, 23)])
def test_resize_matches_torch_trilinear(size, rng):
    volume = rng.random((2, 37, 50, 23), dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(volume)[None], size=size, mode="trilinear", align_corners=False)[0]
    np.testing.assert_allclose(resize_trilinear(volume, size), expected.numpy(), atol=2e-6)


def test_preprocess_matches_monai_transforms(rng):
    from monai.transforms import CropForeground, Resize, ScaleIntensity

    volume = np.zeros((1, 40, 60, 50), np.float32)
    volume[:, 5:31, 10:52, 3:40] = rng.random((1, 26, 42, 37), dtype=np.float32) * 900 + 100
    reference = Resize((32, 64, 64), mode="trilinear")(CropForeground()(ScaleIntensity()(volume)))
    np.testing.assert_allclose(preprocess(volume, (32, 64, 64)), np.asarray(reference), atol=2e-6)


def test_crop_foreground_keeps_volume_without_foreground():
    volume = np.zeros((1, 4, 5, 6), np.float32)
    assert crop_foreground(volume).shape == (1, 4, 5, 6)
    assert min_max(np.full((1, 2, 2, 2), 7.0)).max() == 0.0


def test_nifti_is_read_canonically_as_depth_height_width(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z)
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS on disk
    nib.save(nib.Nifti1Image(data, flip_x), tmp_path / "ct.nii.gz")
    volume = load_volume(tmp_path / "ct.nii.gz")
    assert volume.array.shape == (1, 6, 5, 4)  # [C, D=z, H=y, W=x]
    np.testing.assert_array_equal(volume.array[0], data[::-1].transpose(2, 1, 0))  # reoriented to RAS
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")


def test_bad_volumes_name_file_and_problem(tmp_path):
    with pytest.raises(VolumeError, match=r"missing\.nii\.gz: volume file not found"):
        load_volume(tmp_path / "missing.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti at all" * 30)[:60])
    with pytest.raises(VolumeError, match=r"corrupt\.nii\.gz: cannot read NIfTI volume"):
        load_volume(corrupt)
    np.save(tmp_path / "nan.npy", np.full((1, 2, 2, 2), np.nan, np.float32))
    with pytest.raises(VolumeError, match=r"nan\.npy: volume contains NaN or Inf"):
        load_volume(tmp_path / "nan.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(VolumeError, match=r"flat\.npy: expected \[C, D, H, W\]"):
        load_volume(tmp_path / "flat.npy")
    (tmp_path / "trunc.npy").write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr'")
    with pytest.raises(VolumeError, match=r"trunc\.npy: cannot read \.npy volume"):
        load_volume(tmp_path / "trunc.npy")
