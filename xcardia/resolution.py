"""The resolution study (issue 31): does phenotype guidance help once the heart's walls are resolvable?

Pre-registered in ``results/resolution/README.md`` before any of its numbers existed; this module is what that
text says, and nothing it does may be tuned after a result is seen. The study compares the same patients rendered
at 32³ / 6 mm (the ``cpu`` profile), 48³ / 4 mm and 64³ / 3 mm — always the same 192 mm heart-centred field of
view — in four steps, each of which keeps its outcome in a small file under ``results/resolution/`` so that a
later session (or another machine) continues where the last one stopped:

1. **the cohort gate** (:func:`cohort_gate`): does a single CT measurement recover wall thickness better at the finer
   grid? If not, the renderer is the limit and the finer arm is not trained;
2. **the pilot** (:func:`pilot`): one pretraining epoch and one init's evaluation at the arm's grid, timed, and the
   arm's projected cost on this machine;
3. **units** (:func:`run_unit`): one pretraining run (or one scratch init) with its evaluation — the ``paper``
   protocol and the linear probe on all training labels and at 5 shots, for the encoder the paper's rule selected
   and for the last epoch — written as a record (``runs/<arm>/<unit>.json`` + ``.npz``: the per-patient test
   predictions the paired intervals need, the concept R² of its features, timings, the selected epoch);
4. **tables** (:func:`study_tables`): every comparison and the verdict, computed from the records alone, refusing
   records whose result-shaping settings differ.

A record is keyed by the commit it ran at, the cohort's fingerprint and the digest of the settings that shape its
numbers (:func:`settings_digest`: cohort, render, model, pretraining, the evaluation protocol, the study's version,
torch) — not by the commit alone, so a later commit that changes only docs or screening does not invalidate it.
:data:`STUDY_VERSION` is bumped by any change of code that moves a record's numbers at unchanged settings.

The study's evaluation runs only what its comparisons need (fraction 1.0 and k = 5; no scratch-with-every-layer
baseline): each fine-tuning run and k-shot draw is seeded on its own, so dropping the others changes none of these
numbers — which the 32³ arm checks against the committed ``results/cpu`` run it is built from
(``matches_reference`` in each 32³ record).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from xcardia.atomic import write_atomic, write_json_atomic
from xcardia.cohort.render import STRUCTURES, RenderSpec
from xcardia.config import COMPARED_RUNS, get_profile, replicated
from xcardia.errors import XcardiaError

#: The arms: the same 192 mm heart-centred field of view at three grids (pre-registration, "Arms").
ARMS: dict[str, RenderSpec] = {
    "32": RenderSpec((32, 32, 32), 6.0, "heart"),
    "48": RenderSpec((48, 48, 48), 4.0, "heart"),
    "64": RenderSpec((64, 64, 64), 3.0, "heart"),
}
#: The reference arm: the ``cpu`` profile's own grid, whose runs are those of ``results/cpu``.
REFERENCE_ARM = "32"
#: Pretraining runs of every arm (``nw_only`` is not part of the study) and the scratch floor.
STUDY_RUNS: dict = replicated(COMPARED_RUNS, (0, 1, 2))
SCRATCH_UNITS: tuple[str, ...] = ("scratch_s0", "scratch_s1", "scratch_s2")
#: k of the primary comparison and the all-label fraction of the secondary one.
STUDY_K = 5
STUDY_FRACTION = 1.0
#: Bumped whenever a change of code moves a record's numbers at unchanged settings (records then refuse to mix).
STUDY_VERSION = 1
#: The primary comparisons (X-Cardia − CLIP) and the floor comparisons (X-Cardia − scratch).
PRIMARY = ("xcardia_paper − clip", "xcardia_fixed − clip")
FLOOR = ("xcardia_paper − scratch", "xcardia_fixed − scratch")
#: The cohort gate's thresholds (pre-registration, "The cohort side first").
GATE_AUROC_RISE = 0.02
GATE_CORRELATION_RISE = 0.05
LVWT_TASK = "lvwt_gte_13_flag"
WALL_PHENOTYPES = ("ivsd_cm", "lvpwd_cm")

#: Where the study keeps what is committed (records, gate, pilot, tables) and what is not (cohorts, runs, caches).
def default_results_dir() -> Path:
    from xcardia.paths import project_root

    return project_root() / "results" / "resolution"


def default_work_dir() -> Path:
    from xcardia.paths import project_root

    return project_root() / "outputs" / "resolution"


def _read_json(path: Path, remedy: str) -> dict:
    """A study file (record, gate, pilot) as a dict, or a one-line error naming it and what to do."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise XcardiaError(f"{path}: unreadable ({type(exc).__name__}: {exc}); {remedy}") from None
    if not isinstance(value, dict):
        raise XcardiaError(f"{path}: not a JSON object; {remedy}")
    return value


def _read_gate(results: Path) -> dict | None:
    """``gate.json`` of the study (None before the gate was computed)."""
    path = results / "gate.json"
    if not path.exists():
        return None
    return _read_json(path, f"restore it from git (git checkout -- {path}) or delete it and recompute it "
                            f"(python -m xcardia resolution --arm 48 --only gate)")


def _check_arm(arm: str) -> str:
    arm = str(arm)
    if arm not in ARMS:
        raise XcardiaError(f"unknown arm {arm!r}; the study's arms are {', '.join(ARMS)} (voxels per side)")
    return arm


# ------------------------------------------------------------------------------------------------- settings
def arm_profile(arm: str, base: str = "cpu", render: RenderSpec | None = None):
    """The profile an arm runs: ``base`` (the ``cpu`` profile) with the arm's grid and only the study's runs."""
    from xcardia.reporting import group_of

    prof = get_profile(base)
    render = render or (ARMS[_check_arm(arm)] if base == "cpu" else prof.cohort.render)
    runs = {name: s for name, s in prof.pretrain_runs.items() if group_of(name) in COMPARED_RUNS}
    return replace(prof, cohort=replace(prof.cohort, render=render), pretrain_runs=runs)


def study_spec(profile):
    """The evaluation the study runs: the profile's fine-tuning spec at fraction 1.0 and k = 5 only."""
    return replace(profile.finetune, fractions=(STUDY_FRACTION,), ks=(STUDY_K,), scratch_all_fractions=())


def result_settings(profile) -> dict:
    """Everything that shapes a record's numbers (and nothing that does not: the profile's name, worker counts,
    timeouts)."""
    import torch

    from xcardia.cohort.generate import GENERATOR_VERSION

    return json.loads(json.dumps({
        "study_version": STUDY_VERSION, "generator_version": GENERATOR_VERSION, "torch": torch.__version__,
        "cohort": asdict(profile.cohort), "model": asdict(profile.model), "pretrain": asdict(profile.pretrain),
        "pretrain_runs": profile.pretrain_runs, "init_seeds": list(profile.init_seeds),
        "preprocess": asdict(profile.preprocess), "finetune": asdict(study_spec(profile)),
    }, default=str))


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def settings_digest(settings: dict) -> str:
    """Digest of an arm's result-shaping settings (records of one arm must share it)."""
    return _digest(settings)


def shared_digest(settings: dict) -> str:
    """The same digest without the grid (records of different arms must share it: only the grid may differ)."""
    s = json.loads(json.dumps(settings))
    s["cohort"].pop("render", None)
    s["preprocess"].pop("shape", None)
    s["preprocess"].pop("spacing_mm", None)
    return _digest(s)


def compact_fingerprint(manifest) -> dict:
    """The cohort fingerprint a record carries: who the patients are, their splits and labels, and which images."""
    from xcardia.run_folder import cohort_fingerprint

    fp = cohort_fingerprint(manifest)
    return {k: fp[k] for k in ("rows", "ids", "splits", "labels_sha256", "images")}


def git_commit() -> str:
    from xcardia.reproduce import _git_commit

    return _git_commit()


# ------------------------------------------------------------------------------------------------- cohort gate
def lv_wall_thickness_mm(labelmap: np.ndarray, spacing_mm) -> float:
    """LV wall thickness from a structure label map (pre-registration, amendment 1): 2 × the mean distance to the
    nearest non-myocardium voxel over the myocardium's ridge voxels (whose distance is the largest of their 3×3×3
    neighbourhood within the myocardium), minus one voxel. A slab n voxels thick measures n ± 1 voxels. NaN when
    the label map has no myocardium."""
    from scipy.ndimage import distance_transform_edt, maximum_filter

    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    myo = np.asarray(labelmap) == STRUCTURES["lv_myocardium"]
    if not myo.any():
        return math.nan
    distance = distance_transform_edt(np.pad(myo, 1), sampling=sp)[1:-1, 1:-1, 1:-1]
    ridge = myo & (distance >= maximum_filter(np.where(myo, distance, 0.0), size=3))
    return float(2.0 * distance[ridge].mean() - float(sp.min()))


def gate_measurements(manifest: pd.DataFrame, rows) -> pd.DataFrame:
    """Notebook 01's CT measurements plus the wall thickness, from the label maps of ``rows``."""
    import nibabel as nib

    from xcardia.cohort.measure import ct_measurements
    from xcardia.data.manifest import resolve_ct_path

    records = {}
    for idx in rows:
        img = nib.load(str(resolve_ct_path(manifest, manifest.at[idx, "labelmap_path"])))
        labelmap, zooms = np.asarray(img.dataobj), img.header.get_zooms()[:3]
        records[idx] = {**ct_measurements(labelmap, zooms), "lv_wall_thickness_mm": lv_wall_thickness_mm(labelmap, zooms)}
    return pd.DataFrame.from_dict(records, orient="index")


def gate_arm(manifest: pd.DataFrame) -> dict:
    """One arm's side of the gate on its test patients: notebook 01's visibility table (best single measurement
    per task, the thickness included) and the Spearman correlation of each myocardial measurement with IVSd and
    LVPWd."""
    from scipy.stats import spearmanr

    from xcardia.cohort.measure import ct_visibility_table

    if "labelmap_path" not in manifest:
        raise XcardiaError("the cohort gate needs structure label maps (the synthetic cohort writes them)")
    test = manifest.index[manifest["split"].astype(str) == "test"]
    measured = gate_measurements(manifest, test)
    table = ct_visibility_table(manifest.loc[test], measured)
    correlations = {}
    for m in ("myocardial_volume_ml", "lv_wall_thickness_mm"):
        for p in WALL_PHENOTYPES:
            y = pd.to_numeric(manifest.loc[test, p], errors="coerce").to_numpy(float)
            x = measured[m].to_numpy(float)
            keep = ~(np.isnan(x) | np.isnan(y))
            correlations[f"{m}~{p}"] = {"spearman": float(spearmanr(x[keep], y[keep]).statistic), "n": int(keep.sum())}
    return {"n_test": int(len(test)),
            "visibility": {t: {"best_measurement": r.best_measurement, "best_auroc": float(r.best_auroc),
                               "n_pos": int(r.n_pos), "n_neg": int(r.n_neg),
                               "lv_wall_thickness_auroc": float(r.lv_wall_thickness_mm)}
                           for t, r in table.iterrows()},
            "correlations": correlations,
            "median_wall_thickness_mm": float(np.nanmedian(measured["lv_wall_thickness_mm"]))}


def best_wall_correlation(side: dict) -> float:
    """The gate's correlation reading of one arm: the largest |Spearman ρ| of a myocardial measurement with IVSd or
    LVPWd."""
    return max(abs(v["spearman"]) for v in side["correlations"].values())


def gate_pass_lines(gate: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where a finer arm had to reach to pass (level, rise): the reference arm's best LVWT AUROC and best wall
    correlation plus the pre-registered rises — what the gate figure draws."""
    reference = gate["arms"][REFERENCE_ARM]
    return ((reference["visibility"][LVWT_TASK]["best_auroc"] + GATE_AUROC_RISE, GATE_AUROC_RISE),
            (best_wall_correlation(reference) + GATE_CORRELATION_RISE, GATE_CORRELATION_RISE))


def gate_verdict(reference: dict, finer: dict) -> dict:
    """The pre-registered rule: the finer grid adds resolvable information if the best single measurement's AUROC
    for LVWT ≥ 1.3 rises by ≥ 0.02, or the best correlation with IVSd or LVPWd rises by ≥ 0.05."""
    rise_auroc = finer["visibility"][LVWT_TASK]["best_auroc"] - reference["visibility"][LVWT_TASK]["best_auroc"]
    rise_corr = best_wall_correlation(finer) - best_wall_correlation(reference)
    tol = 1e-9  # a rise of exactly the threshold passes, whatever the float rounding of the difference
    passed = bool(rise_auroc >= GATE_AUROC_RISE - tol or rise_corr >= GATE_CORRELATION_RISE - tol)
    return {"lvwt_best_auroc_rise": float(rise_auroc), "best_wall_correlation_rise": float(rise_corr),
            "passed": passed,
            "reading": ("the finer grid adds resolvable wall information: train it" if passed else
                        "the renderer is the limit: a finer grid shows no more of the walls, so it is not trained")}


def cohort_gate(arms=("32", "48"), work=None, results=None, reference=None, log=print) -> dict:
    """Render (or reuse) each arm's cohort and write ``gate.json`` with both sides and the verdict per finer arm."""
    from xcardia.data.manifest import load_manifest

    results = Path(results) if results else default_results_dir()
    sides = {}
    for arm in arms:
        manifest = load_manifest(arm_cohort(arm, work, reference, log))
        started = time.perf_counter()
        sides[arm] = gate_arm(manifest)
        log(f"[resolution] gate: {arm}³ measured on {sides[arm]['n_test']} test patients "
            f"({time.perf_counter() - started:.0f} s)")
    verdicts = {arm: gate_verdict(sides[REFERENCE_ARM], sides[arm]) for arm in arms if arm != REFERENCE_ARM
                and REFERENCE_ARM in sides}
    payload = {"commit": git_commit(), "arms": sides, "verdicts": verdicts,
               "rule": f"best LVWT AUROC +{GATE_AUROC_RISE} or best |Spearman| with IVSd/LVPWd "
                       f"+{GATE_CORRELATION_RISE} over the {REFERENCE_ARM}³ arm"}
    write_json_atomic(results / "gate.json", payload)
    return payload


def gate_table(gate: dict) -> pd.DataFrame:
    """The gate as one table: arms × (best LVWT measurement and AUROC, thickness AUROC, correlations)."""
    rows = {}
    for arm, side in gate["arms"].items():
        lvwt = side["visibility"][LVWT_TASK]
        row = {"grid": f"{arm}³ / {ARMS[arm].spacing_mm:g} mm", "LVWT best measurement": lvwt["best_measurement"],
               "LVWT best AUROC": lvwt["best_auroc"], "LVWT thickness AUROC": lvwt["lv_wall_thickness_auroc"],
               "LVEF≤45 best AUROC": side["visibility"]["lvef_lte_45_flag"]["best_auroc"],
               "median thickness (mm)": side["median_wall_thickness_mm"]}
        row.update({f"ρ {k.replace('_ml', '').replace('_mm', '')}": v["spearman"]
                    for k, v in side["correlations"].items()})
        rows[arm] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("arm")


# ------------------------------------------------------------------------------------------------- arms and units
def arm_dir(arm: str, work=None) -> Path:
    return Path(work or default_work_dir()) / _check_arm(arm)


def arm_cohort(arm: str, work=None, reference=None, log=print, base: str = "cpu") -> Path:
    """The arm's manifest: the reference reproduction's cohort for the 32³ arm when ``reference`` is given
    (``results/cpu``'s run), otherwise generated (or reused) under the work folder."""
    from xcardia.cohort.generate import prepare_cohort, manifest_file

    if reference is not None and arm == REFERENCE_ARM:
        return manifest_file(Path(reference) / "cohort")
    prof = arm_profile(arm, base)
    started = time.perf_counter()
    path = prepare_cohort(prof, None, arm_dir(arm, work), progress=False)
    log(f"[resolution] {arm}³ cohort ready ({time.perf_counter() - started:.0f} s): {path}")
    return path


def units(profile) -> list[str]:
    """Every unit of an arm: the pretraining runs, then the scratch floor."""
    return [*profile.pretrain_runs, *(f"scratch_s{k}" for k in profile.init_seeds)]


def record_paths(results, arm: str, unit: str) -> tuple[Path, Path]:
    folder = Path(results) / "runs" / arm
    return folder / f"{unit}.json", folder / f"{unit}.npz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _unit_inits(profile, unit: str, runs_dir: Path) -> dict[str, str]:
    from xcardia.finetune.runs import LAST_SUFFIX
    from xcardia.run_folder import RunFolder

    if unit.startswith("scratch_s"):
        return {unit: f"scratch:{unit.removeprefix('scratch_s')}"}
    return {unit: str(runs_dir / unit), unit + LAST_SUFFIX: str(RunFolder(runs_dir / unit).encoder_last)}


def run_unit(arm: str, unit: str, work=None, results=None, reference=None, base: str = "cpu", log=print,
             commit: bool = False) -> Path:
    """Pretrain (or reuse) one unit of an arm, evaluate it and write its record; returns the record's path.

    With ``reference`` (the 32³ arm only): the cohort and pretraining runs of that reproduction are used read-only
    and the record says whether its predictions equal the reproduction's (``matches_reference``)."""
    from xcardia.data.manifest import load_manifest
    from xcardia.finetune.runs import fewshot_experiment, finetune_experiment
    from xcardia.pretrain import pretrain_profile_run
    from xcardia.run_folder import RunFolder

    arm = _check_arm(arm)
    prof = arm_profile(arm, base)
    if unit not in units(prof):
        raise XcardiaError(f"unknown unit {unit!r}; an arm's units are {', '.join(units(prof))}")
    if reference is not None and arm != REFERENCE_ARM:
        raise XcardiaError(f"--reference gives the {REFERENCE_ARM}³ arm's runs; the {arm}³ arm trains its own")
    results = Path(results) if results else default_results_dir()
    work_arm = arm_dir(arm, work)
    manifest_path = arm_cohort(arm, work, reference, log, base)
    runs_dir = Path(reference) / "runs" if reference is not None else work_arm / "runs"
    timing = {}
    started = time.perf_counter()
    if not unit.startswith("scratch_s"):
        if reference is not None:
            folder = RunFolder(runs_dir / unit)
            if (folder.info() or {}).get("status") != "complete":
                raise XcardiaError(f"the reference {reference} holds no finished run {unit}: run the reproduction "
                                   f"first (it is used read-only)")
        run = pretrain_profile_run(prof, unit, manifest_path, runs_dir, cache_dir=work_arm / "cache", progress=False,
                                   log=log)
        info = RunFolder(run).info()
        timing["pretrain_s"] = round(float(info.get("wall_time_s", time.perf_counter() - started)), 1)
        selection = {"epoch": info["selection"]["epoch"], "epochs": int(info["config"]["pretrain"]["epochs"]),
                     "rule": info["selection"].get("criterion")}
    else:
        selection = None
    inits = _unit_inits(prof, unit, runs_dir)
    spec = study_spec(prof)
    started = time.perf_counter()
    eval_dir = work_arm / "eval" / unit
    ft_records, ft_pred, y_test = finetune_experiment(prof, manifest_path, inits, eval_dir / "finetune",
                                                      cache_dir=work_arm / "cache", spec=spec, seed=0, log=log)
    ks_records, ks_pred, _ = fewshot_experiment(prof, manifest_path, inits, eval_dir / "fewshot",
                                                cache_dir=work_arm / "cache", spec=spec, seed=0, log=log)
    timing["evaluate_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    manifest = load_manifest(manifest_path)
    r2 = concept_r2(prof, manifest, inits[unit], work_arm / "cache")
    timing["concept_r2_s"] = round(time.perf_counter() - started, 1)
    test = manifest["split"].astype(str).to_numpy() == "test"
    predictions = {("full", *key): value for key, value in ft_pred.items()}
    predictions.update({("kshot", *key): value for key, value in ks_pred.items()})
    records = pd.concat([ft_records, ks_records], ignore_index=True)
    payload = {
        "study": "resolution", "arm": arm, "grid": list(ARMS[arm].shape) if base == "cpu" else None, "unit": unit,
        "inits": sorted(inits), "commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cohort": compact_fingerprint(manifest), "settings": result_settings(prof),
        "selection": selection, "timing_s": timing, "concept_r2": r2,
        "macro": macro_summary(records), "n_test": int(test.sum()),
    }
    payload["settings_digest"] = settings_digest(payload["settings"])
    payload["shared_digest"] = shared_digest(payload["settings"])
    if reference is not None:
        from xcardia.results import read_metrics

        payload["reference"] = {"path": str(Path(reference).resolve()),
                                "commit": read_metrics(reference).get("run", {}).get("commit")}
        payload["matches_reference"] = matches_reference(reference, ft_pred, ks_pred)
    path = write_record(results, arm, unit, payload, predictions, y_test,
                        manifest["patient_id"].astype(str).to_numpy()[test])
    log(f"[resolution] {arm}³ {unit}: record {path}")
    if commit:
        commit_record(path, f"Resolution study: record of {unit} at {arm}³")
    return path


def concept_r2(profile, manifest: pd.DataFrame, source: str, cache_dir) -> dict:
    """Cross-validated ridge R² of each phenotype from the init's test-patient features (notebook 03's
    computation: :func:`xcardia.interpret.init_features`, :func:`xcardia.interpret.phenotype_axes`)."""
    from xcardia.interpret import init_features, phenotype_axes

    rows = np.flatnonzero((manifest["split"].astype(str) == "test").to_numpy())
    features = init_features(source, manifest, rows, profile, cache_dir, 0)
    table, _, _ = phenotype_axes(features, manifest.iloc[rows].reset_index(drop=True), seed=0)
    return {r.phenotype: (None if math.isnan(r.r2) else float(r.r2)) for r in table.itertuples()}


def macro_summary(records: pd.DataFrame) -> list[dict]:
    """Per protocol × init × setting: the macro AUROC over tasks and seeds (both macro definitions) — for reading a
    record; the study's tables are computed from its predictions."""
    out = []
    for (protocol, init, setting, value), part in records.groupby(["protocol", "init", "setting", "value"], sort=False):
        per_seed = part.groupby("seed")[["auroc", "auroc_public"]].mean()
        out.append({"protocol": protocol, "init": init, "setting": setting, "value": float(value),
                    "macro_auroc": float(per_seed["auroc"].mean()),
                    "macro_auroc_public": float(per_seed["auroc_public"].mean()), "runs": int(len(per_seed))})
    return out


def matches_reference(reference, ft_pred: dict, ks_pred: dict) -> dict:
    """Whether every prediction of the unit equals the reference reproduction's (same init name, same key)."""
    from xcardia.finetune.experiment import load_predictions

    out = {}
    for part, pred, name in (("finetune", ft_pred, "predictions.npz"), ("fewshot", ks_pred, "kshot_predictions.npz")):
        path = Path(reference) / part / name
        if not path.exists():
            out[part] = "no reference predictions"
            continue
        ref = load_predictions(path)
        missing = [k for k in pred if k not in ref]
        differ = [k for k in pred if k in ref and not np.array_equal(pred[k], ref[k], equal_nan=True)]
        out[part] = {"compared": len(pred) - len(missing), "identical": len(pred) - len(missing) - len(differ),
                     "missing_in_reference": len(missing),
                     "max_abs_difference": max((float(np.nanmax(np.abs(pred[k] - ref[k]))) for k in differ), default=0.0)}
    return out


def write_record(results, arm: str, unit: str, payload: dict, predictions: dict, y_test: np.ndarray,
                 test_ids: np.ndarray) -> Path:
    """The record's ``.npz`` (predictions keyed ``full|protocol|init|fraction|seed`` and
    ``kshot|protocol|init|k|draw|task``, only the study's settings; test labels and ids), then its ``.json`` with the
    npz's sha256 — the json last, so a record exists only once both are whole."""
    json_path, npz_path = record_paths(results, arm, unit)
    keep = {k: v for k, v in predictions.items()
            if (k[0] == "full" and math.isclose(float(k[3]), STUDY_FRACTION))
            or (k[0] == "kshot" and int(k[3]) == STUDY_K)}
    arrays = {"|".join(map(str, key)): np.asarray(value, dtype=np.float32) for key, value in keep.items()}
    arrays["test_labels"] = np.asarray(y_test, dtype=np.float32)
    arrays["test_ids"] = np.asarray(test_ids, dtype=str)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(npz_path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    payload = {**payload, "predictions": npz_path.name, "predictions_sha256": _sha256(npz_path),
               "n_predictions": len(keep)}
    write_json_atomic(json_path, payload, indent=1)
    return json_path


def commit_record(path: Path, message: str) -> None:
    """``git commit`` of one record (its json and npz) and nothing else that may be staged."""
    commit_paths(path.parent, [path, path.with_suffix(".npz")], message)


# ------------------------------------------------------------------------------------------------- records → tables
def load_records(results=None) -> dict[str, list[dict]]:
    """Every record under ``results/runs/<arm>/``, by arm, each with its predictions loaded (``_predictions``,
    ``_y_test``, ``_test_ids``). A record whose npz is missing or altered is refused, naming it."""
    from xcardia.finetune.experiment import parse_key

    results = Path(results) if results else default_results_dir()
    out: dict[str, list[dict]] = {}
    for json_path in sorted((results / "runs").glob("*/*.json")):
        record = _read_json(json_path, f"restore it from git (git checkout -- {json_path}) or delete it and its .npz "
                                       f"and rerun that unit")
        npz = json_path.with_name(record.get("predictions", ""))
        if not npz.is_file():
            raise XcardiaError(f"{json_path}: its predictions file {npz.name} is missing; rerun that unit "
                               f"(python -m xcardia resolution --arm {record.get('arm')} --units {record.get('unit')})")
        if _sha256(npz) != record.get("predictions_sha256"):
            raise XcardiaError(f"{npz}: its sha256 differs from the one {json_path.name} recorded — the file was "
                               f"altered or belongs to another run; rerun that unit")
        with np.load(npz) as data:
            record["_y_test"] = data["test_labels"].astype(float)
            record["_test_ids"] = data["test_ids"]
            record["_predictions"] = {parse_key(key): data[key].astype(float)
                                      for key in data.files if key not in ("test_labels", "test_ids")}
        out.setdefault(record["arm"], []).append(record)
    return out


def check_records(by_arm: dict[str, list[dict]]) -> None:
    """Refuse to mix records whose result-shaping settings or patients differ: one settings digest per arm, one
    shared digest (everything but the grid) and one set of patients, splits, labels and test ids across arms."""
    shared, patients = {}, {}
    for arm, records in by_arm.items():
        digests = {r["settings_digest"] for r in records}
        if len(digests) > 1:
            names = {d: [r["unit"] for r in records if r["settings_digest"] == d] for d in digests}
            raise XcardiaError(f"the {arm}³ records were made with different result-shaping settings: "
                               + "; ".join(f"{d}: {', '.join(v)}" for d, v in names.items())
                               + " — rerun the outdated units (their records name the commit they ran at)")
        for r in records:
            shared.setdefault(r["shared_digest"], []).append(f"{arm}/{r['unit']}")
            key = json.dumps({k: r["cohort"][k] for k in ("rows", "ids", "splits", "labels_sha256")}, sort_keys=True)
            patients.setdefault(key + "|" + hashlib.sha256(r["_test_ids"].tobytes()).hexdigest(), []).append(
                f"{arm}/{r['unit']}")
    if len(shared) > 1:
        raise XcardiaError("records of different arms differ in more than the grid (settings digests "
                           + "; ".join(f"{d}: {', '.join(v[:3])}…" for d, v in shared.items()) + ")")
    if len(patients) > 1:
        raise XcardiaError("records disagree on the patients, splits, labels or test set: "
                           + "; ".join(", ".join(v[:3]) for v in patients.values()))


def arm_tables(records: list[dict], n_boot: int, seed: int = 0) -> dict:
    """One arm's seed-aware tables (:func:`xcardia.reporting.seed_aware_tables`, the reference's own function):
    per protocol, all labels and 5 shots — methods and paired comparisons, selected and last epoch."""
    from xcardia.reporting import _full_runs, _kshot_runs, seed_aware_tables

    y = records[0]["_y_test"]
    full, kshot = {}, {}
    for r in records:
        for key, value in r["_predictions"].items():
            (full if key[0] == "full" else kshot)[key[1:]] = value
    inits = sorted({k[1] for k in full} | {k[1] for k in kshot})
    out = {}
    for setting, preds, get in (("all_labels", full, lambda p, n: _full_runs(full, p, n)),
                                ("five_shot", kshot, lambda p, n: _kshot_runs(kshot, p, n, STUDY_K, len(y)))):
        out[setting] = {}
        for protocol in ("paper", "probe"):
            have = [i for i in inits if get(protocol, i) is not None]
            if have:
                out[setting][protocol] = seed_aware_tables(y, lambda n, p=protocol: get(p, n), have, n_boot, seed)
    return out


def study_verdict(tables: dict, gate: dict | None) -> dict:
    """The pre-registered verdict from the arms' 5-shot ``paper`` X-Cardia − CLIP intervals (selected encoders)."""
    def row(arm, comparison):
        paired = tables.get(arm, {}).get("five_shot", {}).get("paper", {}).get("paired", [])
        return next((p for p in paired if p["comparison"] == comparison and p["selection"] == "selected"
                     and p["task"] == "macro"), None)

    def above(r):
        return r is not None and r["ci_low"] is not None and r["ci_low"] > 0

    finer = [a for a in tables if a != REFERENCE_ARM]
    lines, helps = [], False
    for arm in finer:
        for comparison in PRIMARY:
            r, ref = row(arm, comparison), row(REFERENCE_ARM, comparison)
            if r is None or ref is None:
                continue
            if above(r) and not above(ref):
                helps = True
                lines.append(f"{comparison} at 5 shots: interval above 0 at {arm}³, not at {REFERENCE_ARM}³")
    gate_passed = bool(gate and any(v["passed"] for v in gate.get("verdicts", {}).values()))
    at48 = [row("48", c) for c in PRIMARY]
    at48 = [r for r in at48 if r is not None]
    against = (not helps and gate_passed and bool(at48)
               and all(r["ci_low"] is not None and r["ci_low"] <= 0 for r in at48))
    gate48 = (gate or {}).get("verdicts", {}).get("48")
    if gate48 is not None and not gate48["passed"] and not finer:
        verdict = ("not trained: the cohort gate did not pass at 48³ (a finer grid shows no more of the walls in "
                   "this cohort), so by the pre-registration the question is answered on the cohort side — the 32³ "
                   "null result is not the grid's")
    elif not finer or not any(row(a, c) for a in finer for c in PRIMARY) or row(REFERENCE_ARM, PRIMARY[0]) is None:
        verdict = "not yet measurable: the records do not yet hold both arms' X-Cardia and CLIP runs"
    elif helps:
        verdict = "guidance helps at higher resolution (two variants against CLIP, no multiplicity correction)"
    elif against:
        verdict = "against: at 48³ neither variant's 5-shot X-Cardia − CLIP interval lies above 0"
    else:
        verdict = "undecided"
    return {"verdict": verdict, "evidence": lines, "gate_passed": gate_passed}


def study_tables(results=None, n_boot: int | None = None, seed: int = 0, log=print) -> dict:
    """``metrics.json`` and ``summary.md`` of the study from its records (and ``gate.json``/``pilot_*.json``),
    with the figures; arms without records are listed as not run."""
    results = Path(results) if results else default_results_dir()
    by_arm = load_records(results)
    if not by_arm:
        raise XcardiaError(f"no records under {results / 'runs'}: run units first "
                           f"(python -m xcardia resolution --arm 32 --reference outputs/cpu)")
    check_records(by_arm)
    n_boot = n_boot or get_profile("cpu").finetune.n_boot
    tables = {arm: arm_tables(records, n_boot, seed) for arm, records in sorted(by_arm.items(), key=lambda x: int(x[0]))}
    gate = _read_gate(results)
    metrics = {
        "question": "does phenotype guidance help once the heart's walls are resolvable?",
        "arms": {arm: {"units": sorted(r["unit"] for r in recs), "commits": sorted({r["commit"] for r in recs}),
                       "settings_digest": recs[0]["settings_digest"],
                       "timing_s": {r["unit"]: r["timing_s"] for r in recs},
                       "concept_r2": {r["unit"]: r["concept_r2"] for r in recs},
                       "matches_reference": {r["unit"]: r["matches_reference"] for r in recs
                                             if "matches_reference" in r}}
                 for arm, recs in by_arm.items()},
        "not_run": {arm: sorted(set(units(arm_profile(arm))) - {r["unit"] for r in by_arm.get(arm, [])})
                    for arm in ARMS},
        "not_run_reason": not_run_reasons(by_arm, gate),
        "tables": tables, "gate": gate, "verdict": study_verdict(tables, gate), "n_boot": n_boot,
        "pilots": {p.stem.removeprefix("pilot_"): _read_json(p, "restore it from git or delete it and rerun the pilot")
                   for p in sorted(results.glob("pilot_*.json"))},
    }
    write_json_atomic(results / "metrics.json", metrics, indent=1)
    (results / "summary.md").write_text(summary_markdown(metrics))
    try:
        from xcardia.figures import save_figure
        from xcardia.figures.resolution import plot_concept_r2, plot_gate, plot_resolution_auroc

        if gate:
            save_figure(plot_gate(gate, LVWT_TASK, gate_pass_lines(gate)), results, "resolution_gate")
        frames = {s: method_frame(metrics, s, "paper") for s in ("five_shot", "all_labels")}
        save_figure(plot_resolution_auroc(frames, list(metrics["tables"])), results, "resolution_auroc")
        save_figure(plot_concept_r2(metrics), results, "resolution_concept_r2")
    except ValueError as exc:  # nothing to plot yet
        log(f"[resolution] figures skipped: {exc}")
    log(f"[resolution] {results / 'metrics.json'}, {results / 'summary.md'}")
    return metrics


def not_run_reasons(by_arm: dict, gate: dict | None) -> dict:
    """Why an arm has no records: the gate (pre-registered for 48³), or the conditions the 64³ arm depends on."""
    out = {}
    verdicts = (gate or {}).get("verdicts", {})
    for arm in ARMS:
        if arm in by_arm:
            continue
        if arm in verdicts and not verdicts[arm]["passed"]:
            out[arm] = f"the cohort gate did not pass at {arm}³: {verdicts[arm]['reading']}"
        elif arm == "64":
            out[arm] = ("run only if the 48³ pilot projects 48³ ≤ 6 h and 64³ ≤ 10 h (pre-registration); "
                        + ("the 48³ arm was not trained" if verdicts.get("48", {}).get("passed") is False
                           else "no pilot yet"))
        else:
            out[arm] = "not run yet"
    return out


def comparison_frame(metrics: dict, setting: str = "five_shot", protocol: str = "paper",
                     selection: str = "selected") -> pd.DataFrame:
    """arms × comparisons of the macro difference with its interval (long form)."""
    rows = []
    for arm, tables in metrics["tables"].items():
        for p in tables.get(setting, {}).get(protocol, {}).get("paired", []):
            if p["task"] == "macro" and p["selection"] == selection:
                rows.append({"arm": arm, "comparison": p["comparison"], "difference": p["difference"],
                             "ci_low": p["ci_low"], "ci_high": p["ci_high"], "n_seeds": p["n_seeds"]})
    return pd.DataFrame(rows)


def method_frame(metrics: dict, setting: str = "five_shot", protocol: str = "paper") -> pd.DataFrame:
    rows = []
    for arm, tables in metrics["tables"].items():
        for m in tables.get(setting, {}).get(protocol, {}).get("methods", []):
            rows.append({"arm": arm, **{k: m[k] for k in ("method", "auroc", "ci_low", "ci_high", "n_seeds")}})
    return pd.DataFrame(rows)


def summary_markdown(metrics: dict) -> str:
    from xcardia.reporting import format_ci, markdown_table

    lines = ["# The resolution study — results", "",
             f"Computed from the records under `runs/` by `python -m xcardia resolution --only tables`; the question, arms "
             f"and rule are the pre-registration's (`README.md`). Intervals: 95 %, pretraining seeds × test patients "
             f"({metrics['n_boot']} patient resamples).", "", f"**Verdict**: {metrics['verdict']['verdict']}", ""]
    lines += [f"- {e}" for e in metrics["verdict"]["evidence"]]
    if metrics.get("gate"):
        lines += ["", "## The cohort gate (test patients)", "", markdown_table(gate_table(metrics["gate"]), digits=3), ""]
        for arm, v in metrics["gate"]["verdicts"].items():
            lines.append(f"- {arm}³: LVWT best AUROC {v['lvwt_best_auroc_rise']:+.3f}, best wall correlation "
                         f"{v['best_wall_correlation_rise']:+.3f} → {v['reading']}")
    for setting, title in (("five_shot", "5 shots (primary)"), ("all_labels", "all labels (secondary)")):
        for protocol in ("paper", "probe"):
            frame = comparison_frame(metrics, setting, protocol)
            if frame.empty:
                continue
            frame["difference [95% CI]"] = [format_ci(r.difference, r.ci_low, r.ci_high) for r in frame.itertuples()]
            wide = frame.pivot(index="comparison", columns="arm", values="difference [95% CI]")
            lines += ["", f"## {title}, `{protocol}` protocol, selected encoders: paired macro differences", "",
                      markdown_table(wide)]
            methods = method_frame(metrics, setting, protocol)
            methods["macro AUROC [95% CI]"] = [format_ci(r.auroc, r.ci_low, r.ci_high) for r in methods.itertuples()]
            lines += ["", markdown_table(methods.pivot(index="method", columns="arm", values="macro AUROC [95% CI]"))]
    lines += ["", "## Not run", ""]
    for arm, missing in metrics["not_run"].items():
        reason = metrics.get("not_run_reason", {}).get(arm)
        lines.append(f"- {arm}³: " + (f"not run — {reason}" if reason else
                                       ", ".join(missing) if missing else "nothing (complete)"))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- pilot
def pilot(arm: str, work=None, results=None, log=print) -> dict:
    """Price an arm: the cohort (generated or reused), one pretraining epoch of ``xcardia_paper`` (the costliest
    run) and the evaluation of one init (the ``scratch_s0`` unit, whose record it writes), timed; the projection
    is what the arm's remaining units would take on this machine."""
    from xcardia.pretrain import pretrain_profile_run

    arm = _check_arm(arm)
    results = Path(results) if results else default_results_dir()
    prof = arm_profile(arm)
    started = time.perf_counter()
    manifest_path = arm_cohort(arm, work, None, log)
    cohort_s = time.perf_counter() - started
    pilot_runs = arm_dir(arm, work) / "pilot_runs"
    started = time.perf_counter()
    pretrain_profile_run(prof, "xcardia_paper_s0", manifest_path, pilot_runs, cache_dir=arm_dir(arm, work) / "cache",
                         progress=False, log=log, epochs=1)
    epoch_s = time.perf_counter() - started
    started = time.perf_counter()
    run_unit(arm, "scratch_s0", work, results, log=log)
    eval_s = time.perf_counter() - started
    n_runs, n_scratch = len(prof.pretrain_runs), len(prof.init_seeds)
    # a run unit evaluates two encoders (selected and last); the first epoch includes one-off costs, so ×epochs is
    # an upper bound
    projected = n_runs * (prof.pretrain.epochs * epoch_s + 2 * eval_s) + (n_scratch - 1) * eval_s
    payload = {"arm": arm, "commit": git_commit(), "cohort_s": round(cohort_s, 1),
               "pretrain_one_epoch_s": round(epoch_s, 1), "evaluate_one_init_s": round(eval_s, 1),
               "epochs": prof.pretrain.epochs, "runs": n_runs, "scratch_units": n_scratch,
               "projected_remaining_h": round(projected / 3600, 2),
               "rule": "runs × (epochs × one epoch + 2 × one evaluation) + the other scratch units"}
    write_json_atomic(results / f"pilot_{arm}.json", payload)
    log(f"[resolution] pilot {arm}³: one epoch {epoch_s:.0f} s, one evaluation {eval_s:.0f} s → "
        f"{payload['projected_remaining_h']:.1f} h for the rest of the arm")
    return payload


# ------------------------------------------------------------------------------------------------- the command
def run_study(arm: str | None = None, unit_names: list[str] | None = None, work=None, results=None, reference=None,
              steps=("gate", "pilot", "units", "tables"), commit: bool = False, log=print) -> None:
    """The study as one command that skips what is done: the gate (once), the arm's pilot (once, finer arms),
    every unit without a record, then the tables."""
    results = Path(results) if results else default_results_dir()
    if arm is not None:
        arm = _check_arm(arm)
    if reference is not None and not (Path(reference) / "runs").is_dir():
        raise XcardiaError(f"--reference {reference}: not a reproduction folder (no runs/ inside); give the "
                           f"`reproduce --profile cpu` output the 32³ arm comes from")
    if "gate" in steps and arm not in (None, REFERENCE_ARM) and not (results / "gate.json").exists():
        cohort_gate((REFERENCE_ARM, arm), work, results, reference, log)
    if arm not in (None, REFERENCE_ARM) and "units" in steps:
        gate = _read_gate(results)
        verdict = (gate or {}).get("verdicts", {}).get(arm)
        if verdict is None:
            raise XcardiaError(f"the cohort gate has not been computed for {arm}³; run without --only or with "
                               f"--only gate first")
        if not verdict["passed"]:
            raise XcardiaError(f"the cohort gate did not pass at {arm}³ ({verdict['reading']}); by the "
                               f"pre-registration the arm is not trained")
    if "pilot" in steps and arm not in (None, REFERENCE_ARM) and not (results / f"pilot_{arm}.json").exists():
        pilot(arm, work, results, log)
        if commit:
            commit_paths(results, [results / f"pilot_{arm}.json", results / "gate.json",
                                   *record_paths(results, arm, "scratch_s0")], f"Resolution study: pilot at {arm}³")
    if "units" in steps and arm is not None:
        prof = arm_profile(arm)
        todo = unit_names or units(prof)
        for unit in todo:
            if record_paths(results, arm, unit)[0].exists():
                log(f"[resolution] {arm}³ {unit}: recorded already")
                continue
            run_unit(arm, unit, work, results, reference, log=log, commit=commit)
    if "tables" in steps:
        study_tables(results, log=log)


def commit_paths(cwd: Path, paths: list, message: str) -> None:
    """``git add`` + ``git commit`` of ``paths`` only (other staged changes stay staged); a clear error otherwise."""
    existing = [str(p) for p in paths if Path(p).exists()]
    for command in (["git", "add", "--", *existing], ["git", "commit", "-q", "-m", message, "--", *existing]):
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise XcardiaError(f"could not commit {', '.join(existing)}: {done.stderr.strip() or done.stdout.strip()} "
                               f"(the files are written; commit them by hand)")
