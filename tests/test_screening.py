"""Screening (issue 20): the bundle (MONAI layout, safetensors, format version, no pickle), calibration and
operating points, and ``xcardia screen`` on the synthetic test split, a folder of NIfTI files and a DICOM series."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ct_fixtures import write_dicom_series, write_phantom_nifti
from test_qc import SPACING, _abdomen, _contrast
from xcardia.bundle import apply_calibration, fit_calibration, load_bundle, operating_points
from xcardia.cli import main
from xcardia.config import get_profile
from xcardia.errors import XcardiaError
from xcardia.metrics import expected_calibration_error
from xcardia.schema import LABELS


# ------------------------------------------------------------------------------------------ calibration
def _miscalibrated(rng, n):
    """Scores that overstate the risk (what pos_weight does to a fine-tuned head): true p = σ(z), score σ(2z + 1.5)."""
    z = rng.normal(size=n) - 1.0
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return 1 / (1 + np.exp(-(2 * z + 1.5))), y


def test_calibration_fitted_on_val_lowers_ece_on_held_out_patients():
    rng = np.random.default_rng(0)
    p_val, y_val = _miscalibrated(rng, 600)
    p_test, y_test = _miscalibrated(rng, 2000)
    cal = fit_calibration(p_val, y_val)
    assert cal["method"] in ("isotonic", "platt") and set(cal["cv_log_loss"]) == {"isotonic", "platt"}
    before = expected_calibration_error(y_test, p_test)
    after = expected_calibration_error(y_test, apply_calibration(p_test, cal))
    assert after < before / 2, (before, after)


def test_a_task_without_enough_validation_positives_stays_uncalibrated_and_says_why():
    cal = fit_calibration(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1.0]))
    assert cal["method"] == "none" and "1 positive" in cal["reason"]
    np.testing.assert_array_equal(apply_calibration(np.array([0.3]), cal), [0.3])


def test_operating_points_meet_their_targets_on_the_patients_they_were_chosen_on():
    rng = np.random.default_rng(1)
    p, y = _miscalibrated(rng, 500)
    points = operating_points(p, y)
    assert points["sensitivity_90"]["sensitivity"] >= 0.90 and points["specificity_90"]["specificity"] >= 0.90
    # the tightest such thresholds: one step further misses the target
    t = points["sensitivity_90"]["threshold"]
    higher = np.unique(p)[np.unique(p) > t]
    assert ((p[y == 1] >= higher[0]).mean() < 0.90) if len(higher) else True


# ------------------------------------------------------------------------------------------ bundle and screen

def test_the_bundle_has_the_monai_layout_and_reads_through_monai_bundle_offline(bundle_dir):
    from monai.bundle import ConfigParser

    for f in ("configs/metadata.json", "configs/inference.json", "models/model.safetensors", "docs/README.md"):
        assert (bundle_dir / f).is_file(), f
    parser = ConfigParser()
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    assert parser.get("_meta_#format") == "xcardia-screening-bundle"
    network = parser.get_parsed_content("network_def")  # instantiated by MONAI from the config's _target_
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in load_bundle(bundle_dir)["network"].parameters())
    card = (bundle_dir / "docs" / "README.md").read_text()
    assert "**NOT FOR CLINICAL USE" in card and "AUROC" in card


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("tamper, message", [
    (lambda d: _edit_meta(d, format_version=99), "version 99"),
    (lambda d: (d / "configs" / "inference.json").write_text(
        (d / "configs" / "inference.json").read_text().replace('"threshold": 0.', '"threshold": 5.', 1)),
     r"edited after export: configs/inference\.json"),
    (lambda d: (d / "models" / "model.safetensors").write_bytes(
        (d / "models" / "model.safetensors").read_bytes()[:-8] + bytes(8)),
     r"edited after export: models/model\.safetensors"),
    (lambda d: (d / "docs" / "notes.txt").write_text("added later"), r"docs/notes\.txt was not part of the export"),
    (lambda d: (d / "configs" / "integrity.json").unlink(), "no configs/integrity.json"),
    (lambda d: _fifo(d / "models" / "model.safetensors"), "not a regular file"),
    (lambda d: torch.save({"x": torch.zeros(1)}, d / "models" / "extra.pt"), "pickled code"),
    (lambda d: (d / "configs" / "metadata.json").unlink(), "no configs/metadata.json"),
])
def test_a_changed_damaged_or_pickled_bundle_is_refused_in_one_line(bundle_dir, tmp_path, tamper, message):
    """Issue 32.1/32.3: the integrity record (sha256 of every file, written last by export) is verified before any
    other file is read — an edited config or weight, an added or missing file, a FIFO in place of the weights."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    tamper(copy)
    with pytest.raises(XcardiaError, match=message):
        load_bundle(copy)


def _edit_meta(folder, **changes):
    path = folder / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_screening_the_test_split_reproduces_the_paper_protocols_test_predictions_and_resumes(
        tiny_cohort, bundle_dir, tmp_path):
    from xcardia.data.manifest import load_manifest
    from xcardia.finetune import finetune_experiment
    from xcardia.screening import label_free_manifest

    manifest = load_manifest(tiny_cohort)
    labels_free = label_free_manifest(manifest, "test", tmp_path / "test.csv")
    assert set(pd.read_csv(labels_free).columns) <= {"patient_id", "ct_path", "heart_mask_path"}
    out = tmp_path / "screened"
    assert main(["screen", "--model", str(bundle_dir), "--data", str(labels_free), "--out", str(out)]) == 0
    predictions = pd.read_csv(out / "predictions.csv").astype({"patient_id": str})
    assert len(predictions) == (manifest["split"] == "test").sum()
    passed = predictions[predictions["qc"] == "passed"]
    assert len(passed) and all((out / "report" / f"{p}.png").is_file() for p in passed["patient_id"])
    # notebook 04's predictions of the same init, paper protocol, every training label (fraction 1.0, seed 123)
    _, reference, _ = finetune_experiment(get_profile("smoke"), tiny_cohort, {"scratch_s0": "scratch:0"},
                                          tmp_path / "ft", log=lambda *_: None)
    expected = pd.DataFrame(reference[("paper", "scratch_s0", 1.0, 123)], columns=[f"raw_{t}" for t in LABELS])
    expected["patient_id"] = manifest.loc[manifest["split"] == "test", "patient_id"].astype(str).to_numpy()
    joined = passed.merge(expected, on="patient_id", suffixes=("", "_04"))
    compared = 0
    for t in LABELS:
        if joined[f"raw_{t}_04"].isna().all():  # notebook 04 does not score a task without training positives
            continue
        np.testing.assert_allclose(joined[f"raw_{t}"], joined[f"raw_{t}_04"], rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared >= 3  # the tiny cohort's 10 training patients have both classes for three tasks
    before = {p: p.stat().st_mtime_ns for p in (out / "patients").iterdir()}
    assert main(["screen", "--model", str(bundle_dir), "--data", str(labels_free), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "patients").iterdir()} == before  # resumed: nothing redone
    assert json.loads((out / "screen.json").read_text())["counts"]["resumed"] == len(before)


def test_a_folder_of_nifti_files_and_a_dicom_series_is_screened_without_a_manifest_and_bad_series_are_listed(
        bundle_dir, tmp_path, monkeypatch):
    folder = tmp_path / "cts"
    folder.mkdir()
    write_phantom_nifti(folder / "chest.nii.gz", (4.0, 4.0, 4.0), (70, 60, 90))
    for name, volume in (("abdomen", _abdomen()), ("contrast", _contrast())):
        nib.save(nib.Nifti1Image(np.rint(volume).astype(np.int16), np.diag([*SPACING, 1.0])), str(folder / f"{name}.nii.gz"))
    write_dicom_series(folder / "series_7", 24, slice_mm=8.0, chest=True)
    (folder / "notes.txt").write_text("not a CT")
    snapshot = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    import xcardia.data.imaging as imaging

    reads, real_load_ct = [], imaging.load_ct
    monkeypatch.setattr(imaging, "load_ct", lambda path, *a, **k: reads.append(Path(path).name) or real_load_ct(path, *a, **k))
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(out)]) == 0
    assert sorted(reads) == sorted(["chest.nii.gz", "abdomen.nii.gz", "contrast.nii.gz", "series_7"])  # each CT read once
    rows = pd.read_csv(out / "predictions.csv").set_index("patient_id")
    assert set(rows.index) == {"chest", "abdomen", "contrast", "series_7"}
    assert rows.loc["abdomen", "qc"] == "failed" and "body_region" in rows.loc["abdomen", "qc_reason"]
    assert rows.loc["contrast", "qc"] == "failed" and "contrast" in rows.loc["contrast", "qc_reason"]
    assert np.isnan(rows.loc["abdomen", f"risk_{LABELS[0]}"])  # never scored
    assert rows.loc["chest", "qc"] == "passed" and 0 <= rows.loc["chest", f"risk_{LABELS[0]}"] <= 1
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == snapshot  # inputs untouched
    record = json.loads((out / "screen.json").read_text())  # a non-image is listed, and the counts add up
    assert record["skipped_not_an_image"] == ["notes.txt"] and record["counts"]["inputs"] == 4


def test_screen_refuses_to_write_inside_an_input_folder_or_over_foreign_files(bundle_dir, tmp_path, capsys):
    folder = tmp_path / "cts"
    folder.mkdir()
    write_phantom_nifti(folder / "chest.nii.gz", (4.0, 4.0, 4.0), (70, 60, 90))
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(folder / "out")]) == 2
    assert "inside an input folder" in capsys.readouterr().err and not (folder / "out").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(foreign)]) == 2
    assert "not a screening output" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ screening a hospital can trust
def _chest_folder(tmp_path, names):
    folder = tmp_path / "cts"
    folder.mkdir()
    for k, name in enumerate(names):
        write_phantom_nifti(folder / f"{name}.nii.gz", (4.0, 4.0, 4.0), (70 + 2 * k, 60, 90))
    return folder


def test_ids_that_sanitise_alike_and_a_very_long_id_get_their_own_records(bundle_dir, tmp_path):
    """Issue 32.1: ``P 1``, ``P_1`` and ``P/1`` once shared ``patients/P_1.json`` (three patients, one risk)."""
    _chest_folder(tmp_path, ["a", "b", "c", "d"])  # tmp_path/cts, beside the manifest
    long_id = "L" * 248
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"patient_id": ["P 1", "P_1", "P/1", long_id],  # paths relative to the manifest's folder
                  "ct_path": [f"cts/{n}.nii.gz" for n in "abcd"]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    assert main(["screen", "--model", str(bundle_dir), "--data", str(manifest), "--out", str(out), "--no-report"]) == 0
    rows = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert list(rows.index) == ["P 1", "P_1", "P/1", long_id] and len(list((out / "patients").iterdir())) == 4
    risks = rows[f"risk_{LABELS[0]}"]
    assert risks.nunique() > 1  # each patient its own CT's risk (the phantoms differ in size)
    assert all(len(p.name) < 120 for p in (out / "patients").iterdir())


def test_an_interrupted_screen_resumes_with_the_same_command_and_a_second_one_is_told_who_holds_it(
        bundle_dir, tmp_path, monkeypatch, capsys):
    """Issue 32.2: the marker is written before the first patient, so a crash leaves a folder the same command
    resumes (it used to be refused as "not a screening output"); a concurrent screen names the holder."""
    import xcardia.screening as screening

    folder = _chest_folder(tmp_path, ["a", "b", "c"])
    out = tmp_path / "out"
    real_score, calls = screening.score, []

    def crash_after_one(bundle, volume):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the scheduler's kill, mid-run
        return real_score(bundle, volume)

    monkeypatch.setattr(screening, "score", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        screening.screen(bundle_dir, folder, out, reports=False, progress=False, log=lambda *_: None)
    assert json.loads((out / "screen.json").read_text())["status"] == "running"
    monkeypatch.setattr(screening, "score", real_score)
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(out), "--no-report"]) == 0
    record = json.loads((out / "screen.json").read_text())
    assert record["status"] == "complete" and record["counts"]["resumed"] == 1 and record["counts"]["scored"] == 3

    from xcardia.run_folder import RunLock

    with RunLock(out, "screening"):
        assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(out)]) == 2
    assert "in use by a screening (process" in capsys.readouterr().err


def test_a_replaced_ct_is_rescored_and_another_bundle_is_refused(bundle_dir, tmp_path, capsys):
    """Issue 32.1: a record is reused only when its bundle, CT bytes and preprocessing match; a folder screened with
    one bundle is refused to another (its risks would be attributed to the wrong model)."""
    folder = _chest_folder(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(out), "--no-report"]) == 0
    before = pd.read_csv(out / "predictions.csv").set_index("patient_id")
    write_phantom_nifti(folder / "a.nii.gz", (4.0, 4.0, 4.0), (84, 70, 100))  # re-exported under the same name
    lines = []
    from xcardia.screening import screen

    screen(bundle_dir, folder, out, reports=False, progress=False, log=lines.append)
    after = pd.read_csv(out / "predictions.csv").set_index("patient_id")
    assert any("changed since (rescored): a" in line for line in lines)
    assert after.loc["a", f"risk_{LABELS[0]}"] != before.loc["a", f"risk_{LABELS[0]}"]
    assert after.loc["b", f"risk_{LABELS[0]}"] == before.loc["b", f"risk_{LABELS[0]}"]

    other = tmp_path / "other_bundle"
    shutil.copytree(bundle_dir, other)
    meta = json.loads((other / "configs" / "metadata.json").read_text())
    meta["name"] = "another model"
    (other / "configs" / "metadata.json").write_text(json.dumps(meta))
    from xcardia.bundle import write_integrity

    write_integrity(other)  # a genuinely different, intact bundle
    assert main(["screen", "--model", str(other), "--data", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a screening by bundle 'scratch_s0'" in err and "this is bundle 'another model'" in err


def test_export_refuses_the_cohort_folder_and_an_unfinished_run_with_a_flag_it_has_and_waits_for_no_one(
        tiny_cohort, tmp_path, capsys):
    """Issue 32.2/32.5: never inside an input folder; the refusal of an unfinished run names no flag export lacks;
    an export in progress holds its --out (the second is told who holds it)."""
    assert main(["export", "--init", "scratch:0", "--data", str(tiny_cohort), "--profile", "smoke",
                 "--out", str(tiny_cohort / "model"), "--name", "x"]) == 2
    assert "inside the cohort folder" in capsys.readouterr().err and not (tiny_cohort / "model").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running"}))
    assert main(["export", "--init", str(run), "--data", str(tiny_cohort), "--profile", "smoke",
                 "--out", str(tmp_path / "m"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "did not finish" in err and "--allow-unfinished" not in err
    from xcardia.run_folder import RunLock

    with RunLock(tmp_path / ".m2.export", "bundle export"):
        assert main(["export", "--init", "scratch:0", "--data", str(tiny_cohort), "--profile", "smoke",
                     "--out", str(tmp_path / "m2"), "--name", "x"]) == 2
    assert "in use by a bundle export" in capsys.readouterr().err and not (tmp_path / "m2").exists()


def _forge(d, file, edit):
    """A bundle a faulty or foreign exporter wrote: ``edit`` applied to a config, the integrity record renewed."""
    from xcardia.bundle import write_integrity

    path = d / "configs" / file
    data = json.loads(path.read_text())
    edit(data)  # in place
    path.write_text(json.dumps(data))
    write_integrity(d)


def _forge_weights(d, change):
    from safetensors.torch import load_file, save_file

    from xcardia.bundle import write_integrity

    path = d / "models" / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    write_integrity(d)


def _forge_pickle(d):
    """A pickle renamed model.safetensors, with a matching integrity record."""
    from xcardia.bundle import write_integrity

    torch.save({"w": torch.zeros(2)}, d / "models" / "model.safetensors")
    write_integrity(d)


def _first_task(section):
    return lambda inf: inf[section][LABELS[0]]


@pytest.mark.parametrize("forge, message", [
    (lambda d: _forge(d, "inference.json", lambda i: _first_task("operating_points")(i)["sensitivity_90"].update(threshold=5.0)),
     r"operating_points\.lvef_lte_45_flag\.sensitivity_90\.threshold = 5\.0 is not in \[0, 1\]"),
    (lambda d: _forge(d, "inference.json", lambda i: _first_task("operating_points")(i)["specificity_90"].update(threshold=-1)),
     r"threshold = -1 is not in \[0, 1\]"),
    (lambda d: _forge(d, "inference.json", lambda i: _first_task("calibration")(i).update(method="beta")),
     r"calibration\.lvef_lte_45_flag\.method = 'beta' is not none, platt or isotonic"),
    (lambda d: _forge(d, "inference.json", lambda i: _first_task("calibration")(i).update(
        method="platt", platt={"a": float("nan"), "b": 0.0})), r"platt\.a = nan is not finite"),
    (lambda d: _forge(d, "inference.json", lambda i: _first_task("calibration")(i).update(
        method="platt", platt={"a": "1.0", "b": 0.0})), r"platt\.a = '1\.0' is not a number"),
    (lambda d: _forge(d, "inference.json", lambda i: _first_task("calibration")(i).update(
        method="isotonic", isotonic={"x": [0.1, 0.5], "y": [0.2]})), r"isotonic needs x and y lists of the same"),
    (lambda d: _forge(d, "inference.json", lambda i: i["preprocessing"].update(shape=[64, 64, 64])),
     r"preprocessing\.shape = \[64, 64, 64\] differs from the network's declared input"),
    (lambda d: _forge(d, "inference.json", lambda i: i["preprocessing"].update(spacing_mm=0)),
     r"preprocessing\.spacing_mm = 0 is not in"),
    (lambda d: _forge(d, "inference.json", lambda i: i["network_def"].update(_target_="os.system")),
     r"network_def\._target_ = 'os\.system' is not xcardia\.bundle\.ScreeningNetwork"),
    (lambda d: _forge(d, "inference.json", lambda i: i.pop("qc")), r"inference\.json: qc is missing"),
    (lambda d: _forge(d, "inference.json", lambda i: i.update(extra=1)), r"extra is not a key this xcardia writes"),
    (lambda d: _forge(d, "metadata.json", lambda m: m.pop("trained_on")), r"metadata\.json: trained_on is missing"),
    (lambda d: _forge_weights(d, lambda s: s.update({k: v.to(torch.int64) for k, v in
                                                     [kv for kv in s.items() if kv[1].is_floating_point()][:1]})),
     r"model\.safetensors: .* is torch\.int64"),
    (lambda d: _forge_pickle(d),
     r"models/model\.safetensors is not a safetensors file"),
])
def test_a_bundle_with_bad_values_is_refused_in_one_line_naming_file_and_key(bundle_dir, tmp_path, forge, message):
    """Issue 32.3: an intact integrity record cannot vouch for values a faulty exporter wrote; each violation is one
    line naming the file and the key, before any number is computed."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    forge(copy)
    with pytest.raises(XcardiaError, match=message) as caught:
        load_bundle(copy)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("damage, message", [
    (lambda img: img.set_sform(np.diag([4.0, 4.0, 5.0, 1.0]), code=1), "qform and sform disagree"),
    (lambda img: img.header["pixdim"].__setitem__(2, 0.0), "zero or negative entry"),
])
def test_a_nifti_with_ambiguous_geometry_is_listed_with_a_geometry_reason_not_scored(bundle_dir, tmp_path, damage, message):
    """Issue 32.4: a qform/sform disagreement moved the risk silently; a zero pixdim read as "no lungs"."""
    folder = _chest_folder(tmp_path, ["good", "bad"])
    img = nib.load(str(folder / "bad.nii.gz"))
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.set_qform(img.affine, code=1)
    damage(img)
    nib.save(img, str(folder / "bad.nii.gz"))
    out = tmp_path / "out"
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(out), "--no-report"]) == 0
    rows = pd.read_csv(out / "predictions.csv").set_index("patient_id")
    assert rows.loc["good", "qc"] == "passed"
    assert rows.loc["bad", "qc"] == "failed" and message in rows.loc["bad", "qc_reason"]


def test_three_shards_in_parallel_give_the_same_table_as_one_run(bundle_dir, tmp_path):
    """Issue 32.6: N array jobs fill one --out safely; the last to finish writes predictions.csv, identical to an
    unsharded run's; --merge rebuilds it from the records."""
    import subprocess
    import sys

    folder = _chest_folder(tmp_path, [f"p{k}" for k in range(6)])
    single = tmp_path / "single"
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(single), "--no-report"]) == 0
    sharded = tmp_path / "sharded"
    jobs = [subprocess.Popen([sys.executable, "-m", "xcardia", "screen", "--model", str(bundle_dir), "--data", str(folder),
                              "--out", str(sharded), "--no-report", "--shard", f"{k}/3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2, 3)]
    results = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [r[1][-500:] for r in results]
    a = pd.read_csv(single / "predictions.csv")
    b = pd.read_csv(sharded / "predictions.csv")
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((sharded / "screen.json").read_text())["status"] == "complete"
    (sharded / "predictions.csv").unlink()
    assert main(["screen", "--model", str(bundle_dir), "--data", str(folder), "--out", str(sharded), "--merge"]) == 0
    pd.testing.assert_frame_equal(a, pd.read_csv(sharded / "predictions.csv"))


def test_screen_refuses_to_write_inside_a_heart_mask_folder(bundle_dir, tmp_path, capsys):
    """Issue 32.5: the README's "never inside an input folder" holds for the masks' folder too."""
    folder = _chest_folder(tmp_path, ["a"])
    masks = tmp_path / "masks"
    masks.mkdir()
    write_phantom_nifti(masks / "a_heart.nii.gz", (4.0, 4.0, 4.0), (70, 60, 90))
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"patient_id": ["a"], "ct_path": [str(folder / "a.nii.gz")],
                  "heart_mask_path": [str(masks / "a_heart.nii.gz")]}).to_csv(manifest, index=False)
    assert main(["screen", "--model", str(bundle_dir), "--data", str(manifest), "--out", str(masks / "out")]) == 2
    assert "inside an input folder" in capsys.readouterr().err and not (masks / "out").exists()


def test_a_resumed_screen_reads_no_unchanged_ct_again_to_fingerprint_it(bundle_dir, tmp_path, monkeypatch):
    """The content sha256 is recomputed only for a CT whose size or modification time changed since its record — a
    resumed screen, or the last of N shards checking every patient, does not read the whole archive again."""
    import xcardia.screening as screening

    folder = _chest_folder(tmp_path, ["a", "b", "c"])
    out = tmp_path / "out"
    screening.screen(bundle_dir, folder, out, reports=False, progress=False, log=lambda *_: None)
    hashed, real = [], screening.ct_fingerprint
    monkeypatch.setattr(screening, "ct_fingerprint", lambda path: hashed.append(path.name) or real(path))
    screening.screen(bundle_dir, folder, out, reports=False, progress=False, log=lambda *_: None)
    assert hashed == []
    write_phantom_nifti(folder / "b.nii.gz", (4.0, 4.0, 4.0), (84, 70, 100))
    screening.screen(bundle_dir, folder, out, reports=False, progress=False, log=lambda *_: None)
    assert hashed == ["b.nii.gz"]
    assert "ct_stat" not in pd.read_csv(out / "predictions.csv").columns
