"""DICOM series folders read as the NIfTI path reads the same volume, and one named error per broken series.

The series are written here with pydicom from a NIfTI-style array and affine, placing each slice with its
own ImagePositionPatient / ImageOrientationPatient / PixelSpacing in LPS, as scanners do."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from m3d_jax.data.volume import VolumeError, load_volume

SLOPE, INTERCEPT = 2.0, -1024.0
# A left-right and anterior-posterior flipped grid with anisotropic spacing and an offset: the reader must
# sort, place and reorient, not only stack.
AFFINE = np.array([[-0.8, 0.0, 0.0, 90.0], [0.0, -0.7, 0.0, 110.0], [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1]])


def _stored(shape=(12, 10, 7), seed=0) -> np.ndarray:
    """Stored int16 values on the NIfTI grid [x, y, z]."""
    return np.random.default_rng(seed).integers(0, 2000, shape).astype(np.int16)


def _write_nifti(path, stored: np.ndarray, affine=AFFINE):
    image = nib.Nifti1Image(stored, affine)
    image.header.set_slope_inter(SLOPE, INTERCEPT)
    nib.save(image, path)
    return path


def _slice(stored: np.ndarray, k: int, affine: np.ndarray, series: str, *, syntax=ExplicitVRLittleEndian,
           position_shift: float = 0.0) -> pydicom.Dataset:
    """Slice k of `stored` [x, y, z] as a CT image: rows run along y, columns along x; positions in LPS."""
    to_lps = np.diag([-1.0, -1.0, 1.0])
    row_dir, col_dir = to_lps @ affine[:3, 0], to_lps @ affine[:3, 1]
    position = to_lps @ (affine[:3, 3] + k * affine[:3, 2]) + position_shift * to_lps @ affine[:3, 2]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, series
    ds.Modality, ds.InstanceNumber = "CT", k + 1
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in (*(row_dir / np.linalg.norm(row_dir)),
                                                     *(col_dir / np.linalg.norm(col_dir)))]
    ds.PixelSpacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))]
    ds.SliceThickness = float(np.linalg.norm(affine[:3, 2]))
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    pixels = np.ascontiguousarray(stored[:, :, k].T)  # [rows = y, columns = x]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = encapsulate([b"\x00" * 64]) if syntax.is_compressed else pixels.tobytes()
    return ds


def _write_series(folder, stored: np.ndarray, affine=AFFINE, series: str | None = None, skip=(), **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    order = np.random.default_rng(1).permutation(stored.shape[2])  # file names say nothing about position
    for name, k in enumerate(order):
        if k not in skip:
            _slice(stored, int(k), affine, series, **kwargs).save_as(folder / f"IM{name:04d}", enforce_file_format=True)
    return folder


def _nibabel_canonical(path) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: nibabel's RAS-canonical image of the NIfTI, as [1, z, y, x] float32 and its affine."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj, np.float32).transpose(2, 1, 0)[None], image.affine


def test_a_series_reads_as_nibabel_reads_the_same_volume_as_nifti(tmp_path):
    stored = _stored()
    expected, affine = _nibabel_canonical(_write_nifti(tmp_path / "ct.nii.gz", stored))
    from_dicom = load_volume(_write_series(tmp_path / "series", stored))
    assert from_dicom.array.shape == expected.shape == (1, 7, 10, 12)
    np.testing.assert_array_equal(from_dicom.array, expected)  # sorted, rescaled, reoriented
    np.testing.assert_allclose(from_dicom.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(load_volume(tmp_path / "ct.nii.gz").array, from_dicom.array)  # as the NIfTI path
    assert nib.aff2axcodes(from_dicom.affine) == ("R", "A", "S")
    assert from_dicom.array.min() >= INTERCEPT  # the rescale was applied (stored values start at 0)


def test_an_oblique_series_keeps_its_rotation(tmp_path):
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 0.9, 3.0])
    affine[:3, 3] = [-40.0, 25.0, 10.0]
    stored = _stored((8, 9, 5), seed=2)
    expected, expected_affine = _nibabel_canonical(_write_nifti(tmp_path / "oblique.nii", stored, affine))
    from_dicom = load_volume(_write_series(tmp_path / "series", stored, affine))
    np.testing.assert_array_equal(from_dicom.array, expected)
    np.testing.assert_allclose(from_dicom.affine, expected_affine, atol=1e-5)


def test_two_series_in_one_folder_are_named(tmp_path):
    folder = _write_series(tmp_path / "mixed", _stored(), series="1.2.3.1")
    _slice(_stored(seed=5), 0, AFFINE, "1.2.3.2").save_as(folder / "other", enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"mixed: 2 series mixed in one folder .*1\.2\.3\.1, 1\.2\.3\.2"):
        load_volume(folder)


def test_a_missing_slice_is_named_with_its_neighbours(tmp_path):
    folder = _write_series(tmp_path / "gap", _stored(), skip=(3,))
    with pytest.raises(VolumeError, match=r"gap: 1 slice\(s\) missing between IM\d{4} and IM\d{4} \(a gap of 5 mm "
                                          r"where the series steps 2\.5 mm\)"):
        load_volume(folder)


def test_uneven_spacing_is_named(tmp_path):
    stored = _stored()
    folder = _write_series(tmp_path / "uneven", stored, skip=(4,))
    _slice(stored, 4, AFFINE, pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID,
           position_shift=0.4).save_as(folder / "shifted", enforce_file_format=True)
    message = r"uneven: uneven slice spacing: 3\.5 mm between IM\d{4} and shifted, 2\.5 mm elsewhere"
    with pytest.raises(VolumeError, match=message):
        load_volume(folder)


def test_compressed_pixels_without_a_decoder_are_named(tmp_path):
    folder = _write_series(tmp_path / "j2k", _stored((6, 5, 3)), syntax=JPEG2000Lossless)
    message = (r"IM\d{4}: compressed pixel data \(JPEG 2000 Image Compression \(Lossless Only\), "
               r"1\.2\.840\.10008\.1\.2\.4\.90\) that no installed decoder")
    with pytest.raises(VolumeError, match=message):
        load_volume(folder)


def test_a_stray_file_and_an_empty_folder_are_named(tmp_path):
    folder = _write_series(tmp_path / "stray", _stored((6, 5, 3)))
    (folder / "notes.txt").write_text("not a slice")
    with pytest.raises(VolumeError, match=r"notes\.txt: not a readable DICOM file"):
        load_volume(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match=r"empty: an empty folder, not a DICOM series"):
        load_volume(tmp_path / "empty")


def test_the_voxel_cap_applies_before_pixels_are_read(tmp_path):
    folder = _write_series(tmp_path / "big", _stored())
    with pytest.raises(VolumeError, match=r"big: 7 slices of 10×12 = 840 voxels exceed the limit of 100"):
        load_volume(folder, max_voxels=100)
