"""Cohort generation: determinism across workers, the manifest, splits, folder safety and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from xcardia.cli import main
from xcardia.cohort.generate import CohortError, CohortSpec, assign_splits, generate_cohort
from xcardia.cohort.render import RenderSpec
from xcardia.schema import CONCEPT_NAMES, LABELS, SPLITS
from xcardia.data.manifest import load_manifest

from conftest import TINY_SPEC

SMALL = CohortSpec(n_patients=6, seed=9, render=RenderSpec((16, 16, 16), 10.0, "heart"))


def test_same_spec_gives_byte_identical_manifest_and_voxels_whatever_the_workers(tmp_path):
    one = generate_cohort(tmp_path / "w1", SMALL, workers=1, progress=False)
    two = generate_cohort(tmp_path / "w2", SMALL, workers=2, progress=False)
    assert one.read_bytes() == two.read_bytes()
    for pid in ("SYN000000", "SYN000005"):
        for folder in ("ct", "labelmap"):
            a = nib.load(str(tmp_path / "w1" / folder / f"{pid}.nii.gz"))
            b = nib.load(str(tmp_path / "w2" / folder / f"{pid}.nii.gz"))
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)


#: sha256 of the manifest and of every CT/label-map array (+ affine) of the cohort below, generator 2.0. They pin the
#: order of every random draw in ``physiology.sample_patient`` and ``render.render_ct``: moving, adding or removing a
#: draw changes them. A change that is meant to alter the cohort bumps ``GENERATOR_VERSION`` and these values in the
#: same commit; a numpy/scipy upgrade that changes them is a change of the cohort too (say so in the data card).
PINNED_SPEC = CohortSpec(n_patients=12, seed=9, render=RenderSpec((24, 24, 24), 14.0, "chest"))
PINNED_MANIFEST_SHA256 = "6d24ca40a8def33180a9d54a272743464de4508f0ea566c57519bde98edf38b5"
PINNED_VOXELS_SHA256 = "a1ca116732f9ffea26ae0dab75e24872067fb9ce7ae9aed6d8bead04244dcb0e"


def test_the_order_of_random_draws_is_pinned_byte_for_byte(tmp_path):
    """Two effusions, coronary, valve and annular calcium among these 12 patients: every stage and painter draws."""
    import hashlib

    manifest = generate_cohort(tmp_path / "c", PINNED_SPEC, workers=1, progress=False)
    df = pd.read_csv(manifest)
    assert (df["gt_effusion_thickness_mm"] > 0).sum() == 2 and (df["gt_mac_volume_mm3"] > 0).sum() == 1
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == PINNED_MANIFEST_SHA256
    voxels = hashlib.sha256()
    for folder in ("ct", "labelmap"):
        for path in sorted((tmp_path / "c" / folder).glob("*.nii.gz")):
            image = nib.load(str(path))
            voxels.update(np.asarray(image.dataobj).tobytes())
            voxels.update(image.affine.tobytes())
    assert voxels.hexdigest() == PINNED_VOXELS_SHA256


def test_manifest_columns_and_missing_cells(tiny_cohort):
    df = load_manifest(tiny_cohort)
    for col in ("patient_id", "ct_path", "labelmap_path", "split", *LABELS, *CONCEPT_NAMES):
        assert col in df.columns
    assert any(c.startswith("gt_") for c in df.columns)
    assert df["ct_path"].str.fullmatch(r"ct/SYN\d{6}\.nii\.gz").all()
    raw = (tiny_cohort / "manifest.csv").read_text()
    assert ",," in raw and "nan" not in raw.lower().replace("mv_", "")  # missing values are empty cells
    values = df[list(LABELS)].to_numpy(dtype=float).ravel()
    assert set(values[~np.isnan(values)]) <= {0.0, 1.0}


def test_splits_are_patient_level_disjoint_and_exact():
    splits = assign_splits(101, 4, (0.5, 0.2, 0.1, 0.2))
    counts = {s: splits.count(s) for s in SPLITS}
    assert sum(counts.values()) == 101 and set(splits) <= set(SPLITS)
    assert counts == {"pretrain": 51, "train": 20, "val": 10, "test": 20}
    assert assign_splits(101, 4, (0.5, 0.2, 0.1, 0.2)) == splits
    assert assign_splits(101, 5, (0.5, 0.2, 0.1, 0.2)) != splits


def test_cohort_json_records_the_spec_and_a_regenerate_command(tiny_cohort):
    meta = json.loads((tiny_cohort / "cohort.json").read_text())
    assert CohortSpec.from_json(meta["spec"]) == TINY_SPEC
    assert meta["regenerate"].startswith("python -m xcardia generate --n-patients 40")
    assert sum(meta["split_counts"].values()) == 40


def test_rerun_on_a_complete_cohort_is_a_no_op(tiny_cohort):
    before = (tiny_cohort / "manifest.csv").stat().st_mtime_ns
    generate_cohort(tiny_cohort, TINY_SPEC, progress=False)
    assert (tiny_cohort / "manifest.csv").stat().st_mtime_ns == before


def test_folder_holding_a_different_cohort_is_refused(tiny_cohort):
    with pytest.raises(CohortError, match="different cohort"):
        generate_cohort(tiny_cohort, replace(TINY_SPEC, seed=99), progress=False)


def test_unrelated_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CohortError, match="not empty"):
        generate_cohort(tmp_path, SMALL, progress=False)


def test_interrupted_generation_is_not_complete_and_reruns_to_completion(tmp_path, monkeypatch):
    import xcardia.cohort.generate as gen

    calls = {"n": 0}
    real = gen._generate_one

    def crash_on_third(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(gen, "_generate_one", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path, SMALL, progress=False)
    assert not (tmp_path / "cohort.json").exists() and not (tmp_path / "manifest.csv").exists()
    with pytest.raises(Exception, match="unfinished"):
        load_manifest(tmp_path)
    with pytest.raises(CohortError, match="unfinished generation of a different cohort"):
        generate_cohort(tmp_path, replace(SMALL, seed=1), progress=False)
    monkeypatch.setattr(gen, "_generate_one", real)
    generate_cohort(tmp_path, SMALL, progress=False)
    assert len(pd.read_csv(tmp_path / "manifest.csv")) == SMALL.n_patients


@pytest.mark.parametrize("argv, message", [
    (["--n-patients", "-5"], "positive integer"),
    (["--profile", "laptop"], "invalid choice"),
    (["--shape", "8"], "at least 16"),
    (["--spacing", "0"], "positive number"),
    (["--splits", "0.5,0.5"], "four fractions"),
])
def test_cli_bad_generate_arguments_give_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", *argv, "--out", str(tmp_path / "c")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_cli_refuses_an_output_folder_with_a_different_cohort(tiny_cohort, capsys):
    code = main(["generate", "--n-patients", "5", "--shape", "16", "--spacing", "10", "--out", str(tiny_cohort)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different cohort" in err and len(err.splitlines()) == 1


def test_cli_generates_a_cohort(tmp_path, capsys):
    code = main(["generate", "--profile", "smoke", "--n-patients", "4", "--shape", "16", "--spacing", "10",
                 "--seed", "2", "--out", str(tmp_path / "c")])
    assert code == 0
    df = load_manifest(tmp_path / "c")
    assert len(df) == 4 and (tmp_path / "c" / "cohort.json").exists()


@pytest.mark.parametrize("seed", range(12))
def test_every_generated_value_passes_the_validators_cell_checks(seed):
    """Issue 12: the generator and the validator agree on every seed — 400 patients' tables per seed (12 seeds,
    4,800 patients) written as a manifest writes them, then checked cell by cell as every command checks them."""
    import pandas as pd

    from xcardia.cohort.generate import manifest_columns
    from xcardia.cohort.physiology import sample_patient
    from xcardia.data.checks import cell_problems

    rows = []
    for i in range(400):
        patient = sample_patient(seed, i)
        rows.append({**patient.table, **patient.gt, "patient_id": patient.patient_id,
                     "ct_path": f"ct/{patient.patient_id}.nii.gz",  # one CT per patient (the leakage check)
                     "split": "train"})
    columns = [c for c in manifest_columns(False) if c in rows[0] or c in ("patient_id", "ct_path", "split")]
    raw = pd.DataFrame(rows)[columns].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    problems = [p for p in cell_problems(raw) if p.severity == "error"]
    assert not problems, [str(p) for p in problems[:5]]


@pytest.mark.parametrize("shape, spacing, seed", [(24, 8.0, 9), (32, 6.0, 21)])
def test_a_freshly_generated_cohort_validates_clean(tmp_path, shape, spacing, seed):
    from xcardia.data.validate import validate_manifest

    spec = CohortSpec(n_patients=40, seed=seed, render=RenderSpec((shape,) * 3, spacing, "heart"))
    generate_cohort(tmp_path / "c", spec, workers=1, progress=False)
    report = validate_manifest(tmp_path / "c")
    assert report.ok, report.to_text()
