"""Issue 34: the model card's subgroup table and the shifted-scanner render."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from xcardia.cli import main
from xcardia.schema import LABELS
from xcardia.subgroups import (AGE_BANDS, MIN_PER_CLASS, SHIFT, calibration_slope_intercept, render_shifted_scans,
                               shift_table, subgroup_masks, subgroup_table)


def test_subgroup_masks_split_by_sex_and_the_fixed_age_bands_and_leave_missing_values_out():
    table = pd.DataFrame({"sex": ["F", "M", "M", None], "age_years": [45.0, 60.0, 80.0, 70.0]})
    masks = subgroup_masks(table)
    assert list(masks) == ["all", "sex F", "sex M", *[name for *_, name in AGE_BANDS]]
    assert masks["sex F"].tolist() == [True, False, False, False]
    assert masks["age 60–74"].tolist() == [False, True, False, True]  # 60 opens the band, 75 closes it
    assert masks["age ≥ 75"].tolist() == [False, False, True, False]
    assert sum(masks[n].sum() for *_, n in AGE_BANDS) == 4 and sum(masks[s].sum() for s in ("sex F", "sex M")) == 3


def test_calibration_slope_and_intercept_are_one_and_zero_for_calibrated_risks_and_flag_overconfidence():
    rng = np.random.default_rng(0)
    risk = rng.uniform(0.02, 0.98, 20000)
    y = (rng.random(20000) < risk).astype(float)
    slope, intercept = calibration_slope_intercept(y, risk)
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.05)
    logit = np.log(risk / (1 - risk))
    overconfident = 1 / (1 + np.exp(-2 * logit))  # twice too extreme: slope 1/2
    assert calibration_slope_intercept(y, overconfident)[0] == pytest.approx(0.5, abs=0.05)
    assert all(math.isnan(v) for v in calibration_slope_intercept(np.zeros(10), risk[:10]))


def test_a_subgroup_too_small_for_an_interval_says_so_and_keeps_its_counts():
    table = pd.DataFrame({"sex": ["F"] * 6 + ["M"] * 30, "age_years": [50.0] * 36})
    rng = np.random.default_rng(1)
    y = np.zeros((36, 1))
    y[[0, 1, 10, 11, 12, 13, 14, 15, 16, 17], 0] = 1
    risk = np.clip(y * 0.3 + rng.random((36, 1)) * 0.7, 0, 1)
    points = {"t": {"sensitivity_90": {"threshold": 0.3}}}
    out = subgroup_table(table, y, risk, points, n_boot=50, tasks=("t",)).set_index("subgroup")
    assert (out.loc["sex F", "n_pos"], out.loc["sex F", "n_neg"]) == (2, 4)
    assert out.loc["sex F", "interval"] == "too small for an interval" and math.isnan(out.loc["sex F", "auroc_low"])
    assert out.loc["sex M", "interval"] == "yes" and out.loc["sex M", "auroc_low"] <= out.loc["sex M", "auroc"]
    assert out.loc["sex M", "n_pos"] >= MIN_PER_CLASS
    assert not math.isnan(out.loc["sex M", "sensitivity_90_sensitivity_low"])


def test_the_bundle_card_and_metadata_hold_the_subgroup_table_with_its_counts(bundle_dir, tiny_cohort):
    from xcardia.data.manifest import load_manifest

    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    rows = pd.DataFrame(meta["test_subgroups"])
    manifest = load_manifest(tiny_cohort)
    test = manifest[manifest["split"] == "test"]
    groups = subgroup_masks(test.reset_index(drop=True))
    assert list(dict.fromkeys(rows["subgroup"])) == list(groups) and len(rows) == len(groups) * len(LABELS)
    for (group, task), row in rows.set_index(["subgroup", "task"]).iterrows():
        y = test[task].to_numpy(float)[groups[group]]
        assert (row["n"], row["n_pos"], row["n_neg"]) == (groups[group].sum(), (y == 1).sum(), (y == 0).sum())
        assert row["interval"] == ("yes" if min(row["n_pos"], row["n_neg"]) >= MIN_PER_CLASS else "too small for an interval")
    card = (bundle_dir / "docs" / "README.md").read_text()
    assert "## Performance by subgroup" in card and "What a site must measure" in card
    assert "cannot show about subgroups" in card  # a synthetic cohort says what it cannot show
    assert card.count("| lvef_lte_45_flag | ") >= len(groups)


def test_the_shifted_render_differs_only_in_noise_same_patients_same_labels(tiny_cohort, tmp_path):
    from xcardia.data.manifest import load_manifest

    manifest = load_manifest(tiny_cohort)
    rows = np.flatnonzero((manifest["split"] == "test").to_numpy())[:3]
    shifted = pd.read_csv(render_shifted_scans(manifest, rows, tmp_path / "shifted"))
    assert shifted["patient_id"].astype(str).tolist() == manifest["patient_id"].iloc[rows].astype(str).tolist()
    assert set(shifted.columns) == {"patient_id", "ct_path"}  # label-free: screening never sees the labels
    for r, rel in zip(rows, shifted["ct_path"]):
        original = nib.load(str(tiny_cohort / manifest["ct_path"].iloc[r]))
        new = nib.load(str(tmp_path / "shifted" / rel))
        assert np.allclose(original.affine, new.affine) and original.shape == new.shape
        a, b = np.asarray(original.dataobj, float), np.asarray(new.dataobj, float)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # the same anatomy, phase and position
        # the same noise field at a larger amplitude: the difference is the added noise, and nothing else
        sd = float(manifest["gt_noise_sd_hu"].iloc[r])
        added = min(sd * SHIFT["noise_factor"], SHIFT["noise_cap_hu"]) - sd
        assert np.std(b - a) == pytest.approx(added, rel=0.1)
    assert SHIFT["noise_factor"] == 2.0


def test_the_shift_table_pairs_the_same_patients():
    rng = np.random.default_rng(2)
    y = (rng.random((80, 1)) < 0.4).astype(float)
    original = np.clip(y * 0.4 + rng.random((80, 1)) * 0.6, 0, 1)
    out = shift_table(y, original, original.copy(), n_boot=50, tasks=("t",)).iloc[0]
    assert out["difference"] == 0.0 and out["difference_low"] == 0.0 and out["difference_high"] == 0.0
    noisy = np.clip(original + rng.normal(0, 0.5, (80, 1)), 0, 1)
    worse = shift_table(y, original, noisy, n_boot=50, tasks=("t",)).iloc[0]
    assert worse["difference"] < 0 and worse["difference_low"] <= worse["difference"] <= worse["difference_high"]


def test_screening_a_labelled_manifest_writes_the_subgroup_table_into_screen_json(bundle_dir, tiny_cohort, tmp_path):
    """Issue 34.1: an evaluation run (a manifest that still has its labels) reports performance by subgroup; a
    label-free one does not."""
    from xcardia.data.manifest import load_manifest
    from xcardia.screening import label_free_manifest

    manifest = load_manifest(tiny_cohort)
    test = manifest[manifest["split"] == "test"]
    labelled = tmp_path / "labelled.csv"
    test[["patient_id", "ct_path", "sex", "age_years", *LABELS]].assign(
        ct_path=[str(tiny_cohort / p) for p in test["ct_path"]]).to_csv(labelled, index=False)
    assert main(["screen", "--model", str(bundle_dir), "--data", str(labelled), "--out", str(tmp_path / "s")]) == 0
    record = json.loads((tmp_path / "s" / "screen.json").read_text())
    rows = pd.DataFrame(record["performance_by_subgroup"])
    assert set(rows["subgroup"]) >= {"all", "sex F", "sex M"} and set(rows["task"]) == set(LABELS)
    assert int(rows[(rows["subgroup"] == "all") & (rows["task"] == LABELS[0])]["n"].iloc[0]) == record["counts"]["scored"]
    blind = label_free_manifest(manifest, "test", tmp_path / "blind.csv")
    assert main(["screen", "--model", str(bundle_dir), "--data", str(blind), "--out", str(tmp_path / "b")]) == 0
    assert "performance_by_subgroup" not in json.loads((tmp_path / "b" / "screen.json").read_text())


def test_the_bundle_card_reports_the_shifted_scanner_on_the_same_test_patients(bundle_dir, tiny_cohort):
    """Issue 34.2: the card and metadata carry the shifted-scanner check — every test patient re-rendered, its QC,
    and per task AUROC on both scans with the paired difference."""
    from xcardia.data.manifest import load_manifest

    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    check = meta["test_shifted_scanner"]
    n_test = int((load_manifest(tiny_cohort)["split"] == "test").sum())
    assert check["n"] == n_test and 0 <= check["qc_passed"] <= n_test and check["shift"]["noise_factor"] == 2.0
    assert [r["task"] for r in check["table"]] == list(LABELS)
    card = (bundle_dir / "docs" / "README.md").read_text()
    assert "## On a shifted scanner: low dose (noise SD × 2)" in card and f"{check['qc_passed']} of {n_test}" in card
