"""Bad volume files fail with one named error before any large allocation: lying headers, the voxel cap,
channel counts, values that do not fit float32; and a tool prints that error as one line."""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
import subprocess
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from m3d_jax.data.volume import MAX_VOXELS_ENV, VolumeError, check_channels, load_volume
from m3d_jax.errors import InputError

ROOT = pathlib.Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
SMALL = 16 * 2**20  # bytes: a failed load may read headers, never the declared voxels


def _nifti_bytes(data: np.ndarray, affine=None, slope: float = 1.0, inter: float = 0.0, order: str = "<") -> bytes:
    """A single-file NIfTI-1 with exactly these voxels and scaling (nibabel's writer would rescale them)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    affine = np.eye(4) if affine is None else affine
    header.set_sform(affine, 1)
    header.set_qform(affine, 1)
    header["scl_slope"], header["scl_inter"] = slope, inter
    header.set_data_offset(352)
    if order == ">":
        header = header.as_byteswapped(">")
    voxels = data.astype(data.dtype.newbyteorder(order)).tobytes(order="F")
    return header.binaryblock + b"\0" * 4 + voxels


def _claim_shape(nifti: bytes, shape: tuple[int, int, int]) -> bytes:
    """The same file with dim[1..3] (little-endian int16 at byte 42) rewritten: a header that lies."""
    patched = bytearray(nifti)
    struct.pack_into("<3h", patched, 42, *shape)
    return bytes(patched)


def _load_small(path, **kwargs):
    """load_volume under tracemalloc: raises what it raises, and asserts the peak stayed under SMALL."""
    tracemalloc.start()
    try:
        return load_volume(path, **kwargs)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < SMALL, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_lying_nifti_header_is_refused_before_reading(tmp_path, suffix):
    lying = _claim_shape(_nifti_bytes(np.ones((2, 2, 2), np.float32)), (800, 800, 800))
    path = tmp_path / f"lying{suffix}"
    path.write_bytes(gzip.compress(lying) if suffix.endswith(".gz") else lying)
    has = "it gunzips to" if suffix.endswith(".gz") else "the file has"
    with pytest.raises(VolumeError, match=rf"lying{suffix}: cannot read NIfTI volume \(the header declares shape "
                                          rf"\(800, 800, 800\) of float32, 2,048,000,352 bytes with the header, but "
                                          rf"{has} 384: truncated, or a wrong header\)"):
        _load_small(path)


def test_header_past_the_voxel_cap_is_refused_before_gunzipping(tmp_path):
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(_claim_shape(_nifti_bytes(np.ones((2, 2, 2), np.float32)), (1700, 1700, 1700))))
    with pytest.raises(VolumeError, match=rf"huge\.nii\.gz: shape \(1700, 1700, 1700\) is 4,913,000,000 voxels, over "
                                          rf"the limit of 1,073,741,824; .*{MAX_VOXELS_ENV}=4913000000"):
        _load_small(path)


def test_truncated_npy_claiming_a_huge_shape_is_refused(tmp_path):
    path = tmp_path / "short.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (1, 900, 900, 900)})
        handle.write(b"\0" * 64)
    with pytest.raises(VolumeError, match=r"short\.npy: cannot read \.npy volume \(the header declares shape "
                                          r"\(1, 900, 900, 900\) of float32, 2,916,000,128 bytes with the header, "
                                          r"but the file has 192: truncated"):
        _load_small(path)


def test_voxel_cap_and_its_overrides(tmp_path, monkeypatch):
    path = tmp_path / "cube.npy"
    np.save(path, np.ones((1, 8, 8, 8), np.float32))
    with pytest.raises(VolumeError, match=rf"cube\.npy: shape \(1, 8, 8, 8\) is 512 voxels, over the limit of 511; "
                                          rf"if the volume is real, raise the limit with the environment variable "
                                          rf"{MAX_VOXELS_ENV}=512 \(or load_volume\(\.\.\., max_voxels=512\)\)"):
        load_volume(path, max_voxels=511)
    monkeypatch.setenv(MAX_VOXELS_ENV, "100")
    with pytest.raises(VolumeError, match="over the limit of 100"):
        load_volume(path)
    assert load_volume(path, max_voxels=512).array.shape == (1, 8, 8, 8)  # the argument wins over the environment
    monkeypatch.setenv(MAX_VOXELS_ENV, "1_000")
    assert load_volume(path).array.shape == (1, 8, 8, 8)
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(InputError, match=rf"{MAX_VOXELS_ENV}='lots': expected a positive whole number of voxels"):
        load_volume(path)


def test_channel_count_is_checked_against_the_model(tmp_path):
    np.save(tmp_path / "two.npy", np.ones((2, 4, 4, 4), np.float32))
    with pytest.raises(VolumeError, match=r"two\.npy: 2 channels \(shape \(2, 4, 4, 4\)\), expected 1"):
        load_volume(tmp_path / "two.npy", channels=1)
    volume = load_volume(tmp_path / "two.npy", channels=2)
    with pytest.raises(VolumeError, match=r"two\.npy: 2 channels .*expected 1"):
        check_channels(volume, 1)
    (tmp_path / "one.nii").write_bytes(_nifti_bytes(np.ones((4, 5, 6), np.int16)))
    with pytest.raises(VolumeError, match=r"one\.nii: 1 channel \(shape \(1, 6, 5, 4\)\), expected 2"):
        load_volume(tmp_path / "one.nii", channels=2)


def test_finite_values_beyond_float32_say_overflow(tmp_path):
    huge = np.ones((1, 3, 3, 3))
    huge[0, 1, 1, 1] = 1e300
    np.save(tmp_path / "huge.npy", huge)
    with pytest.raises(VolumeError, match=r"huge\.npy: values up to 1e\+300 overflow float32"):
        load_volume(tmp_path / "huge.npy")
    (tmp_path / "scaled.nii").write_bytes(_nifti_bytes(np.full((3, 3, 3), -30000, np.int16), slope=1e35))
    with pytest.raises(VolumeError, match=r"scaled\.nii: values up to -3e\+39 after the header's scaling "
                                          r"\(scl_slope 1e\+35, scl_inter 0\) overflow float32"):
        load_volume(tmp_path / "scaled.nii")


def test_nan_and_inf_are_still_named(tmp_path):
    bad = np.ones((3, 3, 3))
    bad[1, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(VolumeError, match=r"nan\.npy: volume contains NaN or Inf voxels"):
        load_volume(tmp_path / "nan.npy")
    bad[1, 1, 1] = -np.inf
    (tmp_path / "inf.nii.gz").write_bytes(gzip.compress(_nifti_bytes(bad.astype(np.float32))))
    with pytest.raises(VolumeError, match=r"inf\.nii\.gz: volume contains NaN or Inf voxels"):
        load_volume(tmp_path / "inf.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_checked_nifti_reads_match_nibabel(tmp_path, suffix, rng):
    """The header-first reader gives nibabel's values and RAS-canonical affine: scaling, big-endian, oblique."""
    oblique = np.array([[0, -1.2, 0.1, 10], [0.9, 0, 0, -5], [0, 0.05, -2.5, 3], [0, 0, 0, 1]])
    for data, affine, slope, inter, order in [
        ((rng.random((7, 8, 9)) * 3000).astype(np.int16), oblique, 2.5, -1024.0, ">"),
        (rng.random((5, 6, 7)).astype(np.float64), np.diag([-1.0, 1.0, -1.0, 1.0]), 1.0, 0.0, "<"),
    ]:
        blob = _nifti_bytes(data, affine, slope, inter, order)
        path = tmp_path / f"ct{suffix}"
        path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
        reference = nib.as_closest_canonical(nib.load(path))
        volume = load_volume(path)
        np.testing.assert_array_equal(volume.array[0], np.asarray(reference.dataobj, np.float32).transpose(2, 1, 0))
        np.testing.assert_allclose(volume.affine, reference.affine)


def test_tool_prints_a_bad_volume_as_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(_claim_shape(_nifti_bytes(np.ones((2, 2, 2), np.float32)), (800, 800, 800))))
    result = subprocess.run([sys.executable, "tools/infer.py", f"--ckpt={tmp_path}", f"--volume={corrupt}",
                             "--question=?"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {corrupt}: cannot read NIfTI volume"), result.stderr
