"""Shared fixtures: tiny synthetic cohorts generated once per test session."""

from __future__ import annotations

import pandas as pd
import pytest

from ct_fixtures import write_dicom_series, write_phantom_nifti

from xcardia.cohort.generate import CohortSpec, generate_cohort
from xcardia.cohort.render import RenderSpec

#: A cohort small enough to generate in a second, large enough that every split has patients.
TINY_SPEC = CohortSpec(n_patients=40, seed=3, render=RenderSpec((24, 24, 24), 8.0, "heart"),
                       split_fractions=(0.5, 0.2, 0.1, 0.2))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """Folder of a 40-patient cohort at 24³ (label maps included)."""
    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, TINY_SPEC, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def bundle_dir(tiny_cohort, tmp_path_factory):
    """A screening bundle exported from a scratch init of the tiny cohort (read-only: tests that damage one copy it)."""
    from xcardia.cli import main

    out = tmp_path_factory.mktemp("bundle") / "model"
    assert main(["export", "--init", "scratch:0", "--data", str(tiny_cohort), "--profile", "smoke", "--out", str(out),
                 "--name", "scratch_s0"]) == 0
    return out


@pytest.fixture(scope="session")
def smoke_reproduction(tmp_path_factory):
    """``reproduce --profile smoke`` of every notebook in the repository, once per session (the notebook tests and
    the browser test share it)."""
    from xcardia.reproduce import reproduce

    out = tmp_path_factory.mktemp("smoke")
    reproduce(profile="smoke", out=out, seed=0, log=lambda *_: None)
    return out


@pytest.fixture
def paper_cohort(tmp_path):
    """Four patients in the paper's column names: two NIfTI (RAS and LPS), one DICOM series, one .npy-free row."""
    write_phantom_nifti(tmp_path / "a.nii.gz", (2.0, 2.0, 2.0), (100, 90, 120))
    write_phantom_nifti(tmp_path / "b.nii.gz", (0.8, 0.8, 5.0), (260, 220, 48), "LPS")
    write_dicom_series(tmp_path / "c_series", 16, slice_mm=8.0, chest=True)
    write_phantom_nifti(tmp_path / "d.nii.gz", (1.5, 1.5, 3.0), (140, 120, 80))
    rows = [
        {"patient_id": "P01", "Path": "a.nii.gz", "split": "pretrain", "Patients_Age": 70, "Patients_Sex": "Male",
         "ECHO_lvef_value": 35, "ivs_measurement": 1.0, "lvpw_measurement": 0.9, "lv_d_measurement": 6.0,
         "lv_s_measurement": 5.1, "qt_inverval": 400, "ECHO_pasp_value": 50, "lvef_lte_45_flag": 1,
         "mitral_regurgitation_moderate_or_greater_flag": "moderate"},
        {"patient_id": "P02", "Path": "b.nii.gz", "split": "train", "Patients_Age": 55, "Patients_Sex": "Female",
         "ECHO_lvef_value": 60, "ivs_measurement": "", "lvpw_measurement": 0.8, "lv_d_measurement": 4.5,
         "lv_s_measurement": 2.9, "qt_inverval": 380, "ECHO_pasp_value": "", "lvef_lte_45_flag": 0,
         "mitral_regurgitation_moderate_or_greater_flag": "none"},
        {"patient_id": "P03", "Path": "c_series", "split": "val", "Patients_Age": 81, "Patients_Sex": "F",
         "ECHO_lvef_value": 55, "ivs_measurement": 1.4, "lvpw_measurement": 1.3, "lv_d_measurement": 4.2,
         "lv_s_measurement": 2.8, "qt_inverval": 420, "ECHO_pasp_value": 38, "lvef_lte_45_flag": 0,
         "mitral_regurgitation_moderate_or_greater_flag": "presumed none"},
        {"patient_id": "P04", "Path": "d.nii.gz", "split": "test", "Patients_Age": 62, "Patients_Sex": "M",
         "ECHO_lvef_value": 40, "ivs_measurement": 1.1, "lvpw_measurement": 1.0, "lv_d_measurement": 5.9,
         "lv_s_measurement": 4.7, "qt_inverval": 440, "ECHO_pasp_value": 46, "lvef_lte_45_flag": 1,
         "mitral_regurgitation_moderate_or_greater_flag": "severe"},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "paper_manifest.csv", index=False)
    return tmp_path / "paper_manifest.csv"
