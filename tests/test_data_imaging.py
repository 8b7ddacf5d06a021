"""CT loading and preprocessing with MONAI: formats, orientation and spacing, sanity checks, the cache."""

from __future__ import annotations

from dataclasses import replace

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ct_fixtures import write_dicom_series, write_phantom_nifti
from xcardia.data.imaging import PreprocessCache, PreprocessSpec, preprocess_ct, read_header
from xcardia.errors import XcardiaError

SPEC = PreprocessSpec(shape=(32, 32, 32), spacing_mm=4.0)


def test_dicom_series_from_pydicom_test_files_is_read_and_preprocessed(tmp_path):
    series = write_dicom_series(tmp_path / "series")
    assert read_header(series)["shape"] == (128, 128, 16)
    # pydicom's CT_small is an 85 mm field of view, not a chest: reading is what is tested here, not series QC
    out = preprocess_ct(series, replace(SPEC, series_qc=False))
    assert out.shape == (32, 32, 32) and out.dtype == np.float32
    assert -1.0 <= out.min() < out.max() <= 1.0


def test_lps_thin_slices_and_ras_isotropic_give_the_same_volume(tmp_path):
    lps = write_phantom_nifti(tmp_path / "lps.nii.gz", (0.7, 0.7, 5.0), (330, 260, 60), "LPS")
    ras = write_phantom_nifti(tmp_path / "ras.nii.gz", (2.0, 2.0, 2.0), (116, 92, 150), "RAS")
    a, b = preprocess_ct(lps, SPEC), preprocess_ct(ras, SPEC)
    assert np.abs(a - b).mean() < 0.03
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    # and orientation really is RAS: the spine (bright) is posterior, i.e. at low y
    column = a[16, :, 16]
    assert column[:10].max() > column[22:].max()


def test_npy_volume_needs_its_spacing(tmp_path):
    np.save(tmp_path / "vol.npy", np.full((40, 40, 40), -1000.0) + np.eye(40)[:, :, None] * 1000)
    with pytest.raises(XcardiaError, match="npy_spacing_mm"):
        preprocess_ct(tmp_path / "vol.npy", SPEC)
    # a synthetic pattern, not a chest: reading the geometry is what is tested here, not series QC
    out = preprocess_ct(tmp_path / "vol.npy", PreprocessSpec(shape=(16, 16, 16), spacing_mm=4.0, npy_spacing_mm=2.0,
                                                             series_qc=False))
    assert out.shape == (16, 16, 16)


def _nifti(path, data, spacing=2.0):
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "absent.nii.gz", "does not exist"),
    "corrupt": (lambda d: _write(d / "corrupt.nii.gz", b"\x1f\x8b not really gzip"), "cannot read"),
    "nan": (lambda d: _nifti(d / "nan.nii.gz", np.where(np.eye(20)[:, :, None] > 0, np.nan, -1000.0).repeat(20, 2)
                             .astype(np.float32)), "NaN voxel"),
    "constant": (lambda d: _nifti(d / "flat.nii.gz", np.full((20, 20, 20), 40, np.int16)), "every voxel is 40"),
    "2d": (lambda d: _nifti(d / "flat2d.nii.gz", np.linspace(-1000, 100, 400, dtype=np.float32).reshape(20, 20)),
           "must be 3-D"),
    "4d": (lambda d: _nifti(d / "time.nii.gz", np.linspace(-1000, 100, 16000, dtype=np.float32).reshape(20, 20, 20, 2)),
           "3-D"),
    "unrescaled": (lambda d: _nifti(d / "raw.nii.gz", np.linspace(0, 2000, 8000).reshape(20, 20, 20).astype(np.int16)),
                   "RescaleIntercept"),
    "single_dicom": (lambda d: write_dicom_series(d / "s", 1) / "slice_000.dcm", "whole series"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_ct_gets_a_clear_error_naming_the_file_and_nothing_is_cached(case, tmp_path):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    cache = PreprocessCache(tmp_path / "cache", SPEC)
    with pytest.raises(XcardiaError, match=message) as exc:
        cache.load(path)
    assert str(path) in str(exc.value)
    assert not list((tmp_path / "cache").rglob("*.npy")) if (tmp_path / "cache").exists() else True


def test_second_pass_reads_no_original_file(tmp_path, monkeypatch):
    path = write_phantom_nifti(tmp_path / "ct.nii.gz", (3.0, 3.0, 3.0), (50, 50, 50))
    cache = PreprocessCache(tmp_path / "cache", SPEC)
    first = cache.load(path)
    import xcardia.data.imaging as imaging

    def no_reading(*_a, **_k):
        raise AssertionError("the original file was read again")

    monkeypatch.setattr(imaging, "preprocess_ct", no_reading)
    np.testing.assert_array_equal(cache.load(path), first)


def test_changing_a_parameter_or_the_file_invalidates_the_entry(tmp_path):
    path = write_phantom_nifti(tmp_path / "ct.nii.gz", (3.0, 3.0, 3.0), (50, 50, 50))
    cache = PreprocessCache(tmp_path / "cache", SPEC)
    key = cache.key(path)
    assert PreprocessCache(tmp_path / "cache", PreprocessSpec(shape=(32, 32, 32), spacing_mm=4.0,
                                                              hu_window=(-1000, 1000))).key(path) != key
    cache.load(path)
    write_phantom_nifti(path, (3.0, 3.0, 3.0), (52, 50, 50))  # the scan was replaced
    assert cache.key(path) != key


def test_two_processes_building_the_cache_at_once(tmp_path):
    path = write_phantom_nifti(tmp_path / "ct.nii.gz", (2.0, 2.0, 2.0), (80, 80, 80))
    code = ("import sys; from xcardia.data.imaging import PreprocessCache, PreprocessSpec;"
            f"c = PreprocessCache({str(tmp_path / 'cache')!r}, PreprocessSpec(shape=(32, 32, 32), spacing_mm=4.0));"
            f"print(float(c.load({str(path)!r}).sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp.npy"))
