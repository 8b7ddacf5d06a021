"""The resolution study's machinery (issue 31): the gate's wall thickness, the settings digests that keep records
from mixing, the verdict rules, and a unit's record end to end against the smoke reproduction it is built from."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from xcardia import resolution as rs
from xcardia.cohort.render import STRUCTURES
from xcardia.config import get_profile
from xcardia.errors import XcardiaError


@pytest.mark.parametrize("spacing", [2.0, 6.0])
def test_wall_thickness_of_a_slab_is_its_width_within_one_voxel(spacing):
    measured = {}
    for n in range(1, 8):
        labelmap = np.zeros((20, 20, 20), np.uint8)
        labelmap[4:16, 4:16, 8:8 + n] = STRUCTURES["lv_myocardium"]
        measured[n] = rs.lv_wall_thickness_mm(labelmap, spacing)
        assert abs(measured[n] - n * spacing) <= spacing + 1e-9, (n, measured[n])
    # thicker walls never measure thinner, and two voxels more always measure thicker (an odd width is exact)
    assert all(measured[n + 1] >= measured[n] and measured[n + 2] > measured[n] for n in range(1, 6))
    assert all(math.isclose(measured[n], n * spacing) for n in (1, 3, 5, 7))
    assert math.isnan(rs.lv_wall_thickness_mm(np.zeros((8, 8, 8), np.uint8), spacing))


def test_the_reference_arm_is_the_cpu_profile_and_only_the_grid_differs_between_arms():
    cpu = get_profile("cpu")
    a32, a48 = rs.arm_profile("32"), rs.arm_profile("48")
    assert (a32.cohort, a32.model, a32.pretrain, a32.finetune) == (cpu.cohort, cpu.model, cpu.pretrain, cpu.finetune)
    assert set(a32.pretrain_runs) == {f"{m}_s{k}" for m in ("clip", "xcardia_paper", "xcardia_fixed") for k in (0, 1, 2)}
    assert a48.cohort.render.shape == (48, 48, 48) and a48.cohort.render.spacing_mm == 4.0
    for arm in rs.ARMS:  # the same 192 mm field of view at every grid
        render = rs.ARMS[arm]
        assert render.shape[0] * render.spacing_mm == 192 and render.field_of_view == "heart"
    s32, s48 = rs.result_settings(a32), rs.result_settings(a48)
    assert rs.settings_digest(s32) != rs.settings_digest(s48)
    assert rs.shared_digest(s32) == rs.shared_digest(s48)
    renamed = rs.result_settings(replace(a32, name="another name", generate_workers=7, notebook_timeout_s=5))
    assert rs.settings_digest(renamed) == rs.settings_digest(s32)  # not result-shaping
    changed = rs.result_settings(replace(a32, finetune=replace(a32.finetune, trunk_batchnorm="init")))
    assert rs.shared_digest(changed) != rs.shared_digest(s32)
    assert rs.study_spec(a32).fractions == (1.0,) and rs.study_spec(a32).ks == (5,)


def test_unknown_arm_and_unit_are_refused():
    with pytest.raises(XcardiaError, match="arms are 32, 48, 64"):
        rs.arm_profile("40")
    with pytest.raises(XcardiaError, match="unknown unit"):
        rs.run_unit("48", "nw_only_s0")


def _side(lvwt_auroc, rho):
    return {"visibility": {rs.LVWT_TASK: {"best_auroc": lvwt_auroc}},
            "correlations": {"myocardial_volume_ml~ivsd_cm": {"spearman": rho}}}


def test_gate_rule_is_the_preregistered_one():
    ref = _side(0.70, 0.30)
    assert not rs.gate_verdict(ref, _side(0.719, 0.349))["passed"]
    assert rs.gate_verdict(ref, _side(0.72, 0.30))["passed"]
    assert rs.gate_verdict(ref, _side(0.70, 0.35))["passed"]
    assert rs.gate_verdict(ref, _side(0.70, -0.36))["passed"]  # a correlation's size, whichever its sign


def _tables(intervals: dict) -> dict:
    return {arm: {"five_shot": {"paper": {"paired": [
        {"comparison": c, "selection": "selected", "task": "macro", "difference": (lo + hi) / 2, "ci_low": lo,
         "ci_high": hi} for c, (lo, hi) in rows.items()]}}} for arm, rows in intervals.items()}


def test_study_verdict_follows_the_rule():
    gate = {"verdicts": {"48": {"passed": True}}}
    null = {"xcardia_paper − clip": (-0.02, 0.03), "xcardia_fixed − clip": (-0.03, 0.02)}
    helps = rs.study_verdict(_tables({"32": null, "48": {**null, "xcardia_fixed − clip": (0.01, 0.05)}}), gate)
    assert helps["verdict"].startswith("guidance helps") and "xcardia_fixed − clip" in helps["evidence"][0]
    assert rs.study_verdict(_tables({"32": null, "48": null}), gate)["verdict"].startswith("against")
    both_above = {"xcardia_paper − clip": (0.01, 0.04), "xcardia_fixed − clip": (-0.01, 0.03)}
    assert rs.study_verdict(_tables({"32": both_above, "48": both_above}), gate)["verdict"] == "undecided"
    assert rs.study_verdict(_tables({"32": null}), gate)["verdict"].startswith("not yet measurable")
    failed = rs.study_verdict(_tables({"32": null}), {"verdicts": {"48": {"passed": False}}})
    assert failed["verdict"].startswith("not trained: the cohort gate did not pass")
    # without a passed gate a null at 48³ is not evidence against guidance
    assert rs.study_verdict(_tables({"32": null, "48": null}), {"verdicts": {"48": {"passed": False}}})["verdict"] == \
        "undecided"


def test_cli_refuses_units_without_an_arm_and_unknown_steps(capsys):
    from xcardia.cli import main

    assert main(["resolution", "--units", "clip_s0"]) == 2
    assert "--units needs --arm" in capsys.readouterr().err
    assert main(["resolution", "--arm", "48", "--only", "train"]) == 2
    assert "unknown step" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_records(smoke_reproduction, tmp_path_factory):
    """Two units of the smoke reproduction (one pretraining run, one scratch init) recorded as the 32³ arm."""
    results = tmp_path_factory.mktemp("resolution_results")
    work = tmp_path_factory.mktemp("resolution_work")
    paths = [rs.run_unit("32", unit, work, results, reference=smoke_reproduction, base="smoke", log=lambda *_: None)
             for unit in ("clip_s0", "scratch_s0")]
    return results, paths


def test_a_unit_record_holds_what_the_reference_computed(smoke_records):
    results, paths = smoke_records
    record = json.loads(paths[0].read_text())
    assert record["unit"] == "clip_s0" and record["inits"] == ["clip_s0", "clip_s0@last"]
    assert record["selection"]["epoch"] >= 1 and record["timing_s"]["evaluate_s"] > 0
    assert record["selection"]["rule"] == "best validation concept mAP"
    assert set(record["reference"]) == {"path", "commit"} and record["reference"]["path"].startswith("/")
    for part in ("finetune", "fewshot"):  # evaluating one init alone, at the study's settings only, changes nothing
        match = record["matches_reference"][part]
        assert match["compared"] > 0 and match["identical"] == match["compared"], match
    assert set(record["concept_r2"]) >= {"ivsd_cm", "lvpwd_cm"}
    with np.load(paths[0].with_suffix(".npz")) as data:
        keys = [k for k in data.files if k not in ("test_labels", "test_ids")]
        assert {k.split("|")[0] for k in keys} == {"full", "kshot"}
        assert all(k.split("|")[3] in ("1.0", "5") for k in keys)  # only the study's fraction and k


def test_tables_from_records_and_their_refusals(smoke_records, tmp_path):
    results, paths = smoke_records
    metrics = rs.study_tables(results, n_boot=50, log=lambda *_: None)
    methods = {m["method"] for m in metrics["tables"]["32"]["five_shot"]["paper"]["methods"]}
    assert {"clip", "scratch"} <= methods
    assert (results / "summary.md").read_text().startswith("# The resolution study")
    assert (results / "figures" / "resolution_auroc.png").exists()
    assert metrics["verdict"]["verdict"].startswith("not yet measurable")

    altered = tmp_path / "altered"
    shutil.copytree(results, altered)
    npz = altered / "runs" / "32" / "clip_s0.npz"
    npz.write_bytes(npz.read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(XcardiaError, match="sha256 differs"):
        rs.load_records(altered)

    mixed = tmp_path / "mixed"
    shutil.copytree(results, mixed)
    record_path = mixed / "runs" / "32" / "scratch_s0.json"
    record = json.loads(record_path.read_text())
    record["settings_digest"] = "0" * 16
    record_path.write_text(json.dumps(record))
    with pytest.raises(XcardiaError, match="different result-shaping settings"):
        rs.study_tables(mixed, n_boot=50, log=lambda *_: None)


def test_summary_tables_are_written_without_an_optional_dependency():
    """``summary.md``'s tables come from :func:`xcardia.reporting.markdown_table`, not ``DataFrame.to_markdown``
    (which needs ``tabulate``, not in requirements.txt): index first, missing cells "–", a pipe escaped."""
    import pandas as pd

    from xcardia.reporting import markdown_table

    frame = pd.DataFrame({"32": ["+0.01 [−0.02, +0.04]", None], "48": [float("nan"), "a|b"]},
                         index=pd.Index(["clip", "scratch"], name="method"))
    assert markdown_table(frame) == ("| method | 32 | 48 |\n|---|---|---|\n"
                                     "| clip | +0.01 [−0.02, +0.04] | – |\n| scratch | – | a\\|b |")
    numbers = pd.DataFrame({"AUROC": [0.94, 0.9351]}, index=["32", "48"])
    assert markdown_table(numbers, digits=3) == "|  | AUROC |\n|---|---|\n| 32 | 0.940 |\n| 48 | 0.935 |"


@pytest.mark.parametrize("damaged", ["gate.json", "runs/32/clip_s0.json", "pilot_48.json"])
def test_a_torn_study_file_is_refused_in_one_line_naming_it_and_left_as_it_was(damaged, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(rs.default_results_dir(), results)
    path = results / damaged
    path.write_text('{"arms": ')
    with pytest.raises(XcardiaError, match=r"unreadable .*(restore it from git|delete it)") as err:
        rs.study_tables(results, n_boot=10, log=lambda *_: None)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_text() == '{"arms": '
