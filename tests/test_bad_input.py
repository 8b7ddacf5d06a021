"""The bad-input catalogue (issue 12): every refusal is one `error:` line that names the file, row or column and says
what to do; no traceback; no input file changes. One case per row of the table below.

Each case builds its bad input from a fresh copy of the tiny cohort, runs the real CLI in-process, and checks the
exit status, that the message names what it must, that nothing was printed as a traceback, and that every file of
the cohort is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ct_fixtures import write_dicom_series, write_phantom_nifti
from xcardia.cli import main
from xcardia.errors import XcardiaError

SMOKE = ["--profile", "smoke"]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit(cohort: Path, row: int, column: str, value) -> Path:
    """Write a copy of the manifest with one cell changed (the original cohort stays as it was)."""
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    out = cohort / "edited.csv"
    df.to_csv(out, index=False)
    return out


def _nifti(path: Path, data: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


def _point(cohort: Path, ct: Path, **cells) -> Path:
    """A copy of the manifest whose first row points at ``ct`` (and has ``cells``)."""
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[0, "ct_path"] = str(ct)
    for k, v in cells.items():
        df.loc[0, k] = v
    out = cohort / "pointed.csv"
    df.to_csv(out, index=False)
    return out


def _first_train_row(cohort: Path) -> int:
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    return int(np.flatnonzero(df["split"].to_numpy() == "train")[0])


# ------------------------------------------------------------------------------------------------ the cases
# name → (build(cohort, tmp) -> argv, expected exit status, fragments the one-line message must contain)
def _manifest_cell(column, value, command="finetune", row=None):
    def build(c, t):
        m = _edit(c, _first_train_row(c) if row is None else row, column, value)
        if command == "finetune":
            return ["finetune", "--init", "scratch", "--data", str(m), *SMOKE, "--out", str(t / "ft")]
        if command == "pretrain":
            return ["pretrain", "--method", "clip", "--data", str(m), *SMOKE, "--out", str(t / "run")]
        return ["validate", str(m)]
    return build


CASES = {
    # --- cells every command refuses, as validate does
    "label 2 on a train row (finetune)": (_manifest_cell("shd_flag", "2"), 2, ["shd_flag", "row", "not a flag"]),
    "label 2 (fewshot)": (lambda c, t: ["fewshot", "--init", "scratch", "--data", str(_edit(c, 3, "shd_flag", "2")),
                                        *SMOKE, "--out", str(t / "fs")], 2, ["shd_flag", "row 4"]),
    "concept 2 (pretrain)": (_manifest_cell("concept_ivsd_abnormal", "2", "pretrain"), 2, ["concept_ivsd_abnormal"]),
    "inf in a numeric column (pretrain)": (_manifest_cell("lvef_percent", "inf", "pretrain"), 2, ["lvef_percent", "finite"]),
    "nan text in a numeric column": (_manifest_cell("age_years", "nan", "pretrain"), 2, ["age_years", "finite"]),
    "text in a numeric column": (_manifest_cell("qrs_duration_ms", "wide", "pretrain"), 2, ["qrs_duration_ms", "not a number"]),
    "implausible value": (_manifest_cell("lvpwd_cm", "0.05", "pretrain"), 2, ["lvpwd_cm", "plausible"]),
    "wall in mm (validate)": (_manifest_cell("ivsd_cm", "11", "validate"), 1, ["ivsd_cm", "mm"]),
    "LVEF as a fraction (validate)": (_manifest_cell("lvef_percent", "0.55", "validate"), 1, ["lvef_percent", "fraction"]),
    "unknown grade word": (_manifest_cell("mr_grade", "huge", "pretrain"), 2, ["mr_grade", "not one of"]),
    "numeric sex code": (_manifest_cell("sex", "1", "pretrain"), 2, ["sex", "M or F"]),
    "unknown split": (_manifest_cell("split", "training", "pretrain"), 2, ["split", "must be one of"]),
    "empty split": (_manifest_cell("split", "", "pretrain"), 2, ["split", "empty split"]),
    "empty patient_id": (_manifest_cell("patient_id", "", "pretrain", row=0), 2, ["patient_id", "row 1"]),
    "duplicate patient_id": (lambda c, t: ["validate", str(_edit(c, 1, "patient_id", pd.read_csv(c / "manifest.csv")["patient_id"][0]))],
                             1, ["duplicate patient_id", "row 2"]),
    "flag words in a concept": (_manifest_cell("concept_lvidd_abnormal", "yes", "validate"), 1, ["concept_lvidd_abnormal"]),
    "negative spacing cell": (_manifest_cell("npy_spacing_mm", "-2", "validate"), 1, ["npy_spacing_mm", "plausible"]),
    # --- whole-file problems
    "missing ct_path column": (lambda c, t: ["pretrain", "--method", "clip", "--data",
                                             str(_drop_column(c, "ct_path")), *SMOKE, "--out", str(t / "r")], 2, ["ct_path", "missing"]),
    "header-only manifest": (lambda c, t: ["validate", str(_header_only(c))], 1, ["no patient rows"]),
    "header-only manifest (pretrain)": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(_header_only(c)),
                                                      *SMOKE, "--out", str(t / "r")], 2, ["no patient rows"]),
    "empty manifest file": (lambda c, t: ["validate", str(_write(c / "empty.csv", b""))], 1, ["empty"]),
    "UTF-16 manifest": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(_utf16(c)), *SMOKE,
                                      "--out", str(t / "r")], 2, ["UTF-16", "CSV UTF-8"]),
    "semicolon-separated manifest": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(_semicolons(c)),
                                                   *SMOKE, "--out", str(t / "r")], 2, ["';'", "separator"]),
    "folder of NIfTIs without a manifest": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(c / "ct"),
                                                          *SMOKE, "--out", str(t / "r")], 2, ["no manifest.csv", "manifest_schema"]),
    "manifest that does not exist": (lambda c, t: ["validate", str(t / "nope.csv")], 2, ["does not exist"]),
    "paper and native name for one column": (lambda c, t: ["validate", str(_both_names(c)), "--aliases", "paper"],
                                             1, ["Path", "ct_path", "keep one"]),
    # --- files and geometry
    "CT file that does not exist": (lambda c, t: ["validate", str(_point(c, t / "gone.nii.gz"))], 1, ["gone.nii.gz", "does not exist"]),
    "truncated NIfTI": (lambda c, t: ["validate", str(_point(c, _truncated(t)))], 1, ["broken.nii.gz", "corrupt"]),
    "NaN voxels (deep)": (lambda c, t: ["validate", "--deep", str(_point(c, _nifti(t / "nan.nii.gz", _with_nan())))],
                          1, ["nan.nii.gz", "NaN voxel"]),
    "constant volume (deep)": (lambda c, t: ["validate", "--deep", str(_point(c, _nifti(t / "flat.nii.gz", np.zeros((32, 32, 32), np.float32))))],
                               1, ["flat.nii.gz", "every voxel"]),
    "unrescaled volume (deep)": (lambda c, t: ["validate", "--deep", str(_point(c, _nifti(t / "raw.nii.gz", np.full((32, 32, 32), 1024.0, np.float32) + np.arange(32)[:, None, None])))],
                                 1, ["raw.nii.gz", "unrescaled"]),
    "1,200 mm spacing": (lambda c, t: ["validate", str(_point(c, write_phantom_nifti(t / "huge.nii.gz", (1200.0, 1200.0, 1200.0), (20, 20, 20))))],
                         1, ["huge.nii.gz", "spacing", "outside"]),
    "0.1 mm spacing": (lambda c, t: ["validate", str(_point(c, write_phantom_nifti(t / "tiny.nii.gz", (0.1, 0.1, 0.1), (40, 40, 40))))],
                       1, ["tiny.nii.gz", "spacing"]),
    "2-slice DICOM series": (lambda c, t: ["validate", str(_point(c, write_dicom_series(t / "two", 2)))], 1, ["two", "localizer"]),
    "1-slice localizer NIfTI": (lambda c, t: ["validate", str(_point(c, write_phantom_nifti(t / "scout.nii.gz", (1.0, 1.0, 1.0), (256, 256, 1))))],
                                1, ["scout.nii.gz"]),
    "single DICOM file": (lambda c, t: ["validate", str(_point(c, next(write_dicom_series(t / "s", 16).iterdir())))], 1, ["single DICOM file", "folder"]),
    "unknown image format": (lambda c, t: ["validate", str(_point(c, _write(t / "ct.png", b"\x89PNG")))], 1, ["ct.png", "unknown image format"]),
    "4-D image": (lambda c, t: ["validate", str(_point(c, _nifti(t / "4d.nii.gz", np.zeros((20, 20, 20, 3), np.float32))))], 1, ["4d.nii.gz", "3-D"]),
    ".npy without a spacing (deep)": (lambda c, t: ["validate", "--deep", str(_point(c, _npy(t)))], 1, ["npy_spacing_mm"]),
    # --- outputs that would overwrite or pollute inputs
    "--report is the manifest": (lambda c, t: ["validate", str(c), "--report", str(c / "manifest.csv")], 2, ["manifest itself"]),
    "--report into a missing folder": (lambda c, t: ["validate", str(c), "--report", str(t / "no" / "r.json")], 2, ["does not exist", "create it"]),
    "--report inside the image folder": (lambda c, t: ["validate", str(c), "--report", str(c / "ct" / "r.json")], 2, ["image folder"]),
    "--report is a folder": (lambda c, t: ["validate", str(c), "--report", str(t)], 2, ["is a folder"]),
    "generate --out an existing file": (lambda c, t: ["generate", "--n-patients", "20", "--shape", "24", "--out",
                                                      str(_write(t / "f.txt", b"x"))], 2, ["existing file"]),
    "pretrain --out inside the image folder": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(c), *SMOKE,
                                                             "--out", str(c / "ct" / "run")], 2, ["image folder"]),
    "finetune --out is a CT": (lambda c, t: ["finetune", "--init", "scratch", "--data", str(c), *SMOKE, "--out",
                                             str(next((c / "ct").iterdir()))], 2, ["one of the cohort's images"]),
    # --- encoder inits
    "text file as --init": (lambda c, t: ["finetune", "--init", str(_write(t / "enc.txt", b"hello")), "--data", str(c),
                                          *SMOKE, "--out", str(t / "ft")], 2, ["enc.txt", "not a readable weights file"]),
    "malformed encoder file as --init": (lambda c, t: ["finetune", "--init", str(_malformed_encoder(t)), "--data", str(c),
                                                       *SMOKE, "--out", str(t / "ft")], 2, ["bad.pt", "malformed"]),
    "pickle with code as --init": (lambda c, t: ["finetune", "--init", str(_malicious(t)), "--data", str(c), *SMOKE,
                                                 "--out", str(t / "ft")], 2, ["evil.pt", "not a readable weights file"]),
    "--init that does not exist": (lambda c, t: ["finetune", "--init", str(t / "none.pt"), "--data", str(c), *SMOKE,
                                                 "--out", str(t / "ft")], 2, ["does not exist"]),
    "--init name used twice": (lambda c, t: ["finetune", "--init", "a=scratch", "--init", "a=scratch", "--data", str(c),
                                             *SMOKE, "--out", str(t / "ft")], 2, ["used twice"]),
    "--init scratch:x": (lambda c, t: ["finetune", "--init", "scratch:x", "--data", str(c), *SMOKE, "--out", str(t / "ft")],
                         2, ["scratch:K"]),
    # --- run folders
    "--resume without a checkpoint": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(c), *SMOKE, "--out",
                                                    str(t / "r"), "--resume"], 2, ["checkpoint.pt", "does not exist"]),
    "--resume with a corrupt checkpoint": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(c), *SMOKE, "--out",
                                                         str(_corrupt_run(t)), "--resume"], 2, ["checkpoint.pt", "not a readable checkpoint"]),
    # --- arguments
    "--k with letters": (lambda c, t: ["fewshot", "--init", "scratch", "--data", str(c), *SMOKE, "--out", str(t / "fs"),
                                       "--k", "a,b"], 2, ["--k", "integers"]),
    "--k 0": (lambda c, t: ["fewshot", "--init", "scratch", "--data", str(c), *SMOKE, "--out", str(t / "fs"), "--k", "0"],
              2, ["at least 1"]),
    "--shape below 16": (lambda c, t: ["generate", "--shape", "8", "--out", str(t / "g")], 2, ["16 voxels"]),
    "unknown profile": (lambda c, t: ["pretrain", "--method", "clip", "--data", str(c), "--profile", "huge", "--out", str(t / "r")],
                        2, ["invalid choice"]),
    "bad split fractions": (lambda c, t: ["generate", "--splits", "0.5,0.5", "--out", str(t / "g")], 2, ["four fractions"]),
    "--only that matches no notebook": (lambda c, t: ["reproduce", *SMOKE, "--out", str(t / "o"), "--only", "99"], 2, ["--only", "matches no notebook"]),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _drop_column(c: Path, column: str) -> Path:
    df = pd.read_csv(c / "manifest.csv", dtype=str, keep_default_na=False).drop(columns=[column])
    df.to_csv(c / "dropped.csv", index=False)
    return c / "dropped.csv"


def _header_only(c: Path) -> Path:
    header = (c / "manifest.csv").read_text().splitlines()[0]
    return _write(c / "header.csv", (header + "\n").encode())


def _utf16(c: Path) -> Path:
    return _write(c / "utf16.csv", (c / "manifest.csv").read_text().encode("utf-16"))


def _semicolons(c: Path) -> Path:
    pd.read_csv(c / "manifest.csv", dtype=str, keep_default_na=False).to_csv(c / "semi.csv", sep=";", index=False)
    return c / "semi.csv"


def _both_names(c: Path) -> Path:
    df = pd.read_csv(c / "manifest.csv", dtype=str, keep_default_na=False)
    df["Path"] = df["ct_path"]
    df.to_csv(c / "both.csv", index=False)
    return c / "both.csv"


def _truncated(t: Path) -> Path:
    good = write_phantom_nifti(t / "good.nii.gz", (2.0, 2.0, 2.0), (40, 40, 40))
    return _write(t / "broken.nii.gz", good.read_bytes()[:200])


def _with_nan() -> np.ndarray:
    data = np.full((32, 32, 32), -1000.0, np.float32)
    data[10:20, 10:20, 10:20] = 40.0
    data[5, 5, 5] = np.nan
    return data


def _npy(t: Path) -> Path:
    np.save(t / "vol.npy", np.linspace(-1000, 400, 32**3, dtype=np.float32).reshape(32, 32, 32))
    return t / "vol.npy"


def _malformed_encoder(t: Path) -> Path:
    from xcardia.models.weights import ENCODER_FORMAT

    torch.save({"format": ENCODER_FORMAT, "spec": {"nonsense": 1}, "state_dict": {}, "metadata": {}}, t / "bad.pt")
    return t / "bad.pt"


class _Evil:
    def __reduce__(self):
        return (Path("/tmp/xcardia_pwned").touch, ())


def _malicious(t: Path) -> Path:
    torch.save({"format": "x", "payload": _Evil()}, t / "evil.pt")
    return t / "evil.pt"


def _corrupt_run(t: Path) -> Path:
    run = t / "run"
    run.mkdir()
    _write(run / "checkpoint.pt", b"not a checkpoint")
    return run


@pytest.fixture
def cohort(tiny_cohort, tmp_path):
    """A private copy of the tiny cohort (cases edit manifests beside it)."""
    copy = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, copy)
    return copy


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_clear_line_and_nothing_changes(case, cohort, tmp_path, capsys):
    build, status, fragments = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = build(cohort, work)
    before = _snapshot(cohort)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert code == status, (case, code, err[-500:])
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), (case, fragment, err[-600:])
    assert _snapshot(cohort) == before, f"{case}: an input file changed"
    assert not Path("/tmp/xcardia_pwned").exists()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 50


def test_init_path_containing_equals_is_a_path_not_a_name(tmp_path):
    from xcardia.cli import _parse_inits

    weird = tmp_path / "run=1"
    weird.mkdir()
    assert _parse_inits([str(weird)]) == {"run=1": str(weird)}
    assert _parse_inits([f"mine={weird}"]) == {"mine": str(weird)}


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(cohort, tmp_path, capsys, monkeypatch):
    import errno

    import xcardia.pretrain as engine

    run = tmp_path / "run"
    args = ["pretrain", "--method", "clip", "--data", str(cohort), *SMOKE, "--out", str(run), "--epochs", "1",
            "--batch-size", "8"]
    assert main(args) == 0
    saved = (run / "checkpoint.pt").read_bytes()

    def full(_payload, target, *_args, **_kwargs):
        Path(target).write_bytes(b"half a checkpoint")  # the disk fills up part-way through the write
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(engine.torch, "save", full)
    code = main(args[:-4] + ["--epochs", "2", "--batch-size", "8", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert (run / "checkpoint.pt").read_bytes() == saved and not list(run.glob("*.tmp*"))


def test_edited_manifest_is_noticed_by_resume_and_by_reuse(cohort, tmp_path, capsys):
    """Issue 12.2: --resume and finished-run reuse refuse a changed cohort, naming what changed."""
    run = tmp_path / "run"
    base = ["pretrain", "--method", "clip", "--data", str(cohort), *SMOKE, "--out", str(run), "--batch-size", "8"]
    assert main(base + ["--epochs", "1"]) == 0
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    test_row = int(np.flatnonzero(df["split"].to_numpy() == "test")[0])
    df.loc[test_row, "split"] = "pretrain"  # a test patient moved into pretraining
    df.to_csv(cohort / "manifest.csv", index=False)
    assert main(base + ["--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cohort changed" in err and "moved between splits" in err


def test_fine_tuning_results_are_recomputed_after_labels_change(cohort, tmp_path):
    from xcardia.config import get_profile
    from xcardia.finetune import finetune_experiment

    profile = get_profile("smoke")
    spec = profile.finetune.__class__(max_epochs=1, patience=1, fractions=(1.0,), fraction_seeds=(123,),
                                      scratch_all_fractions=(), n_boot=10)
    lines = []
    finetune_experiment(profile, cohort, {"scratch": "scratch"}, tmp_path / "ft", tmp_path / "cache", spec, log=lines.append)
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[df["split"] == "test", "shd_flag"] = "1"
    df.to_csv(cohort / "manifest.csv", index=False)
    lines.clear()
    _, _, y = finetune_experiment(profile, cohort, {"scratch": "scratch"}, tmp_path / "ft", tmp_path / "cache", spec,
                                  log=lines.append)
    assert not any("reusing" in line for line in lines) and any("labels changed" in line for line in lines)
    assert np.nanmin(y[:, -1]) == 1.0


# ------------------------------------------------------------------------------------------ issue 22 (second pass)
@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--method", "clip", "--data", "X", "--out", "O", "--workers", "-1"], "0 or more"),
    (["pretrain", "--method", "clip", "--data", "X", "--out", "O", "--seed", "-1"], "seed in 0.."),
    (["pretrain", "--method", "clip", "--data", "X", "--out", "O", "--seed", str(2**40)], "seed in 0.."),
    (["finetune", "--init", "scratch", "--data", "X", "--out", "O", "--seed", "x"], "integer seed"),
])
def test_bad_workers_and_seeds_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_workers_above_the_cpu_count_are_capped_with_a_notice(capsys):
    import os

    from xcardia.cli import _workers

    assert _workers(str((os.cpu_count() or 1) + 997)) == (os.cpu_count() or 1)
    assert "more than this machine's" in capsys.readouterr().err
    assert _workers("0") == 0


def test_an_unfinished_pretraining_run_is_refused_unless_asked_for(tmp_path, capsys):
    import json as _json

    from xcardia.finetune import refuse_unfinished

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(_json.dumps({"status": "running"}))
    with pytest.raises(XcardiaError, match="did not finish .*status: running.*--allow-unfinished"):
        refuse_unfinished(str(run))
    assert refuse_unfinished(str(run), allow_unfinished=True, log=print) is True
    assert "warning" in capsys.readouterr().out
    (run / "run.json").write_text(_json.dumps({"status": "complete"}))
    assert refuse_unfinished(str(run)) is False


@pytest.mark.parametrize("mutate, problem", [
    (lambda e, other: np.save(e, np.zeros_like(np.load(e))), "checksum mismatch"),
    (lambda e, other: shutil.copyfile(other, e), "checksum mismatch"),      # another patient's tensor
    (lambda e, other: e.write_bytes(e.read_bytes()[:100]), "unreadable"),   # truncated
    (lambda e, other: np.save(e, np.full_like(np.load(e), np.nan)), "non-finite"),
    (lambda e, other: np.save(e, np.zeros((8, 8, 8), np.float32)), "shape"),
    (lambda e, other: e.with_suffix(".json").unlink(), "no valid checksum record"),
])
def test_a_tampered_cache_entry_is_rebuilt_with_a_log_line_never_used(tiny_cohort, tmp_path, capsys, mutate, problem):
    from xcardia.data.imaging import PreprocessCache, PreprocessSpec, preprocess_ct

    spec = PreprocessSpec(shape=(24, 24, 24), spacing_mm=8.0)
    cache = PreprocessCache(tmp_path / "cache", spec)
    a, b = sorted((tiny_cohort / "ct").glob("*.nii.gz"))[:2]
    truth = cache.load(a)
    cache.load(b)
    mutate(cache.entry(a), cache.entry(b))
    again = cache.load(a)
    np.testing.assert_array_equal(again, truth)
    np.testing.assert_array_equal(again, preprocess_ct(a, spec))
    assert problem in capsys.readouterr().err
    np.testing.assert_array_equal(cache.load(a), truth)  # the rebuilt entry is trusted again, silently
    assert "rebuilding" not in capsys.readouterr().err


def test_a_replaced_ct_changes_the_cohort_fingerprint_and_the_refusal_names_it(tiny_cohort, tmp_path):
    from xcardia.data.manifest import load_manifest
    from xcardia.run_folder import cohort_fingerprint, describe_cohort_change

    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    before = cohort_fingerprint(load_manifest(cohort))
    manifest = load_manifest(cohort)
    first, second = manifest["ct_path"].iloc[0], manifest["ct_path"].iloc[1]
    shutil.copyfile(cohort / second, cohort / first)  # the manifest is unchanged; one CT is another patient's now
    after = cohort_fingerprint(load_manifest(cohort))
    change = describe_cohort_change(before, after)
    assert change and "1 image(s) replaced" in change and str(manifest["patient_id"].iloc[0]) in change
    copied = tmp_path / "copied"
    shutil.copytree(cohort, copied)  # copying a cohort (new mtimes) is not a change
    assert describe_cohort_change(after, cohort_fingerprint(load_manifest(copied))) is None


def test_a_fifo_manifest_is_refused_at_once(tmp_path, capsys):
    import os

    fifo = tmp_path / "manifest.csv"
    os.mkfifo(fifo)
    assert main(["validate", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_outputs_never_clobber_a_strangers_folder_the_cohort_folder_or_its_images(tiny_cohort, tmp_path, capsys, command):
    args = {"finetune": ["finetune", "--init", "scratch", "--data", str(tiny_cohort), *SMOKE],
            "pretrain": ["pretrain", "--method", "clip", "--data", str(tiny_cohort), *SMOKE, "--epochs", "1"]}[command]
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "metrics.json").write_text("[1, 2, 3]")
    (stranger / "log.csv").write_text("my own log")
    before = _snapshot(stranger)
    assert main([*args, "--out", str(stranger)]) == 2
    assert "holds no" in capsys.readouterr().err and _snapshot(stranger) == before
    cohort_before = _snapshot(tiny_cohort)
    assert main([*args, "--out", str(tiny_cohort)]) == 2
    assert "cohort's own folder" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "new"), "--cache", str(tiny_cohort / "ct")]) == 2
    assert "--cache" in capsys.readouterr().err and _snapshot(tiny_cohort) == cohort_before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m, root: m.assign(ct_path=[m["ct_path"].iloc[1], *m["ct_path"].iloc[1:]]), "the same CT file as row"),
    (lambda m, root: m.assign(patient_id=[m["patient_id"].iloc[1].lower(), *m["patient_id"].iloc[1:]]),
     "differs only in case"),
    (lambda m, root: (shutil.copyfile(root / m["ct_path"].iloc[1], root / "ct" / "copy.nii.gz"),
                      m.assign(ct_path=["ct/copy.nii.gz", *m["ct_path"].iloc[1:]]))[1], "same content as row"),
])
def test_the_same_ct_in_two_rows_is_refused_as_leakage(tiny_cohort, tmp_path, capsys, edit, message):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    manifest = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    edit(manifest, cohort).to_csv(cohort / "manifest.csv", index=False)
    assert main(["validate", str(cohort)]) == 1
    assert message in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--shape", "100000", "at most 512"), ("--spacing", "1e308", "outside 0.2–10 mm"), ("--spacing", "0.01", "outside"),
])
def test_generate_refuses_sizes_that_would_allocate_petabytes_before_allocating(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--n-patients", "2", flag, value, "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_unclear_messages_now_say_what_happened(tiny_cohort, tmp_path, capsys):
    """Issue 22: a NUL byte is not 'UTF-16'; a symlink loop is not 'does not exist'; a series one folder down is not
    'the folder is empty'; a CRLF-only re-save of the manifest is not a change of the cohort."""
    import os

    from xcardia.data.imaging import read_header
    from xcardia.data.manifest import load_manifest
    from xcardia.run_folder import cohort_fingerprint, describe_cohort_change

    binary = tmp_path / "nul.csv"
    binary.write_bytes(b"patient_id,ct_path,split\nP1,a.nii.gz,train\x00\n")
    assert main(["validate", str(binary)]) in (1, 2)
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "NUL bytes" in said and "UTF-16" not in said
    loop = tmp_path / "loop.nii.gz"
    os.symlink(loop, loop)
    with pytest.raises(XcardiaError, match="symbolic link that leads nowhere"):
        read_header(loop)
    (tmp_path / "outer" / "inner").mkdir(parents=True)
    with pytest.raises(XcardiaError, match="only the subfolder\\(s\\) inner"):
        read_header(tmp_path / "outer")
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    before = cohort_fingerprint(load_manifest(cohort))
    text = (cohort / "manifest.csv").read_bytes()
    (cohort / "manifest.csv").write_bytes(text.replace(b"\n", b"\r\n"))
    assert describe_cohort_change(before, cohort_fingerprint(load_manifest(cohort))) is None
