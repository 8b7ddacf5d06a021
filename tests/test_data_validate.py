"""Manifest validation: every problem at once, with row, patient and column; the paper's column names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from xcardia.cli import main
from xcardia.data.manifest import load_manifest
from xcardia.data.validate import PAPER_ALIASES, validate_manifest


def test_generated_cohort_is_clean(tiny_cohort, capsys):
    report = validate_manifest(tiny_cohort)
    assert report.ok and report.n_rows == 40 and not report.warnings, report.to_text()
    assert main(["validate", str(tiny_cohort)]) == 0


@pytest.fixture
def broken(tiny_cohort, tmp_path):
    """A copy of the tiny cohort's manifest with one planted problem per row."""
    shutil.copytree(tiny_cohort / "ct", tmp_path / "ct")
    df = pd.read_csv(tiny_cohort / "manifest.csv", dtype=str, keep_default_na=False).drop(columns=["labelmap_path"])
    df.loc[0, "lvidd_cm"] = "45"                      # row 1: mm instead of cm
    df.loc[1, "lvef_percent"] = "0.55"                # row 2: a fraction
    df.loc[2, "ct_path"] = "ct/nowhere.nii.gz"        # row 3: missing file
    (tmp_path / "ct" / "broken.nii.gz").write_bytes(b"not a nifti")
    df.loc[3, "ct_path"] = "ct/broken.nii.gz"         # row 4: unreadable file
    df.loc[4, "pasp_mmhg"] = "high"                   # row 5: not a number
    df.loc[5, "lvef_lte_45_flag"] = "2"               # row 6: label outside 1/0/missing
    df.loc[6, "mr_grade"] = "massive"                 # row 7: unknown grade
    df.loc[7, "split"] = "holdout"                    # row 8: unknown split
    df.loc[8, "sex"] = "1"                            # row 9: numeric sex code
    df.loc[9, "mitral_regurgitation_moderate_severe_flag"] = "moderate"  # row 10: a severity word: accepted
    df.loc[10, "pr_grade"] = "presumed none"          # row 11: the paper's word: accepted
    dup = df.iloc[[11]].copy()
    dup["split"] = "test" if df.loc[11, "split"] != "test" else "train"
    df = pd.concat([df, dup], ignore_index=True)      # row 41: same patient in another split
    df["site_code"] = "A"                             # unknown column: warning
    df.to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path


def test_every_problem_is_reported_at_once_with_row_patient_and_column(broken):
    report = validate_manifest(broken / "manifest.csv")
    assert not report.ok
    found = {(p.row, p.column): p for p in report.problems}
    expect = {
        (1, "lvidd_cm"): "looks like mm",
        (2, "lvef_percent"): "fraction",
        (3, "ct_path"): "does not exist",
        (4, "ct_path"): "cannot read",
        (5, "pasp_mmhg"): "not a number",
        (6, "lvef_lte_45_flag"): "not a flag",
        (7, "mr_grade"): "not one of",
        (8, "split"): "split must be one of",
        (9, "sex"): "write M or F",
        (41, "split"): "two splits",
    }
    for where, text in expect.items():
        assert where in found and text in found[where].message, (where, report.to_text())
        assert found[where].patient_id and found[where].severity == "error"
    assert (10, "mitral_regurgitation_moderate_severe_flag") not in found
    assert (11, "pr_grade") not in found
    assert any(p.column == "site_code" and p.severity == "warning" for p in report.problems)
    assert "row 1 (patient SYN" in report.to_text()


def test_cli_exit_code_and_json_report(broken, tmp_path, capsys):
    code = main(["validate", str(broken / "manifest.csv"), "--report", str(tmp_path / "report.json")])
    assert code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["n_errors"] >= 10
    assert "looks like mm" in capsys.readouterr().out


def test_deep_check_reads_voxels_that_a_header_check_cannot_see(tiny_cohort, tmp_path):
    import nibabel as nib

    shutil.copytree(tiny_cohort / "ct", tmp_path / "ct")
    df = pd.read_csv(tiny_cohort / "manifest.csv", dtype=str, keep_default_na=False).drop(columns=["labelmap_path"])
    data = np.full((24, 24, 24), np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([8.0, 8.0, 8.0, 1.0])), str(tmp_path / "ct" / "SYN000000.nii.gz"))
    df.to_csv(tmp_path / "manifest.csv", index=False)
    assert validate_manifest(tmp_path).ok
    deep = validate_manifest(tmp_path, deep=True)
    assert [(p.row, p.column) for p in deep.errors] == [(1, "ct_path")] and "NaN" in deep.errors[0].message


def test_paper_column_names_validate_with_the_mapping_reported(paper_cohort, capsys):
    plain = validate_manifest(paper_cohort)
    assert not plain.ok and "try --aliases paper" in plain.to_text()
    report = validate_manifest(paper_cohort, aliases="paper", deep=True)
    assert report.ok, report.to_text()
    assert report.column_mapping["ivs_measurement"] == "ivsd_cm" and report.column_mapping["Path"] == "ct_path"
    assert main(["validate", str(paper_cohort), "--aliases", "paper"]) == 0
    assert "mapped column qt_inverval -> qt_interval_ms" in capsys.readouterr().out


def test_loading_a_paper_manifest_maps_names_words_and_keeps_missing_missing(paper_cohort):
    df = load_manifest(paper_cohort)
    assert df.attrs["column_mapping"]["ECHO_lvef_value"] == "lvef_percent"
    assert list(df["sex"]) == ["M", "F", "F", "M"]
    assert list(df["mitral_regurgitation_moderate_severe_flag"]) == [1.0, 0.0, 0.0, 1.0]
    assert np.isnan(df.loc[1, "ivsd_cm"]) and np.isnan(df.loc[1, "pasp_mmhg"])


def test_every_paper_alias_targets_a_schema_column():
    from xcardia.schema import COLUMN_BY_NAME

    assert all(target in COLUMN_BY_NAME for target in PAPER_ALIASES.values())
