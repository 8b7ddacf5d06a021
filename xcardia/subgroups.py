"""Performance by subgroup and on a shifted scanner: what a screening committee asks of a model card (TRIPOD+AI
items 23/26, CLAIM 36–39: performance across relevant groups and settings, with intervals and counts).

Subgroups are fixed here, before any subgroup number existed (issue 34): sex (F, M) and three age bands. A subgroup
whose task has fewer than :data:`MIN_PER_CLASS` positives or negatives gets its counts and point estimates but no
interval — the table says "too small for an interval" instead of printing a meaningless one.

The shifted scanner is a low-dose protocol (:data:`SHIFT`): the same test patients re-rendered by the synthetic
generator with the image noise doubled — anatomy, cardiac phase, position, lesions and labels unchanged — also
decided before any number with it existed. It shows the mechanics (does calibration survive a dose change?), not
how a real scanner fleet behaves.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from xcardia.metrics import auroc, bootstrap_auroc_ci, diagnostic_at_threshold, paired_bootstrap_difference
from xcardia.schema import LABELS

#: Age bands (years): [low, high), decided before any subgroup number (common cut points of cardiology cohorts).
AGE_BANDS: tuple[tuple[float, float, str], ...] = ((0.0, 60.0, "age < 60"), (60.0, 75.0, "age 60–74"),
                                                   (75.0, math.inf, "age ≥ 75"))
#: Below this many positives or negatives a subgroup's task gets no interval.
MIN_PER_CLASS = 5
#: The shifted scanner: image noise SD multiplied by this factor (a quarter-dose protocol), capped at 80 HU.
SHIFT = {"name": "low dose (noise SD × 2)", "noise_factor": 2.0, "noise_cap_hu": 80.0}


def subgroup_masks(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """``{"all", "sex F", "sex M", "age < 60", …}`` → boolean masks over the rows of ``table`` (a manifest slice with
    ``sex`` and ``age_years``). A patient with a missing sex or age is in "all" only."""
    n = len(table)
    masks = {"all": np.ones(n, dtype=bool)}
    if "sex" in table:
        sex = table["sex"].astype(str).to_numpy()
        for s in ("F", "M"):
            masks[f"sex {s}"] = sex == s
    if "age_years" in table:
        age = pd.to_numeric(table["age_years"], errors="coerce").to_numpy(dtype=float)
        for low, high, name in AGE_BANDS:
            masks[name] = (age >= low) & (age < high)
    return masks


def calibration_slope_intercept(y: np.ndarray, risk: np.ndarray) -> tuple[float, float]:
    """Logistic recalibration (Cox 1958): ``logit P(y=1) = a + b · logit(risk)``; returns (b, a) — slope 1 and
    intercept 0 are perfect calibration. NaNs when a class is absent or the fit fails."""
    from sklearn.linear_model import LogisticRegression

    keep = ~np.isnan(y) & ~np.isnan(risk)
    y, risk = y[keep], np.clip(risk[keep], 1e-6, 1 - 1e-6)
    if len(np.unique(y)) < 2:
        return math.nan, math.nan
    x = np.log(risk / (1 - risk)).reshape(-1, 1)
    try:
        model = LogisticRegression(C=1e12, max_iter=1000).fit(x, y.astype(int))  # unpenalised in every version
    except ValueError:
        return math.nan, math.nan
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def _bootstrap_calibration(y, risk, n_boot: int, seed: int) -> tuple[tuple[float, float], tuple[float, float]]:
    rng = np.random.default_rng(seed)
    slopes, intercepts = [], []
    for _ in range(n_boot):
        take = rng.integers(0, len(y), len(y))
        b, a = calibration_slope_intercept(y[take], risk[take])
        if not math.isnan(b):
            slopes.append(b)
            intercepts.append(a)
    if len(slopes) < 10:
        return (math.nan, math.nan), (math.nan, math.nan)
    q = lambda v: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975)))  # noqa: E731
    return q(slopes), q(intercepts)


def subgroup_table(table: pd.DataFrame, labels: np.ndarray, risk: np.ndarray, points: dict | None = None,
                   n_boot: int = 200, seed: int = 0, tasks=LABELS) -> pd.DataFrame:
    """Per subgroup × task: counts, AUROC with a patient-bootstrap 95 % CI, calibration slope and intercept with
    bootstrap CIs, and sensitivity/specificity/PPV (Wilson intervals) at each operating point of ``points``
    (``{task: {point: {"threshold": …}}}``, a bundle's). Intervals only where both classes have at least
    :data:`MIN_PER_CLASS` patients (``interval`` says "too small for an interval" otherwise).

    Args:
        table: the patients' manifest rows (``sex``, ``age_years``), in the order of ``labels`` and ``risk``.
        labels: (n, T) of 1, 0 or NaN; ``risk``: (n, T) calibrated risks.
    """
    rows = []
    for group, mask in subgroup_masks(table).items():
        for t, task in enumerate(tasks):
            y, p = labels[mask, t], risk[mask, t]
            n_pos, n_neg = int(np.nansum(y == 1)), int(np.nansum(y == 0))
            row = {"subgroup": group, "task": task, "n": int(mask.sum()), "n_pos": n_pos, "n_neg": n_neg}
            enough = n_pos >= MIN_PER_CLASS and n_neg >= MIN_PER_CLASS
            row["interval"] = "yes" if enough else "too small for an interval"
            if enough:
                ci = bootstrap_auroc_ci(y, p, n_boot=n_boot, seed=seed)
                row.update(auroc=ci["auroc"], auroc_low=ci["ci_low"], auroc_high=ci["ci_high"])
            else:
                row.update(auroc=auroc(y, p), auroc_low=math.nan, auroc_high=math.nan)
            slope, intercept = calibration_slope_intercept(y, p)
            row.update(calibration_slope=slope, calibration_intercept=intercept)
            (s_lo, s_hi), (i_lo, i_hi) = (_bootstrap_calibration(y, p, n_boot, seed) if enough
                                          else ((math.nan, math.nan), (math.nan, math.nan)))
            row.update(slope_low=s_lo, slope_high=s_hi, intercept_low=i_lo, intercept_high=i_hi)
            for point, spec in ((points or {}).get(task) or {}).items():
                threshold = spec.get("threshold")
                if threshold is None or math.isnan(float(threshold)):  # no operating point (a class absent on val)
                    d = {k: math.nan for m in ("sensitivity", "specificity", "ppv") for k in (m, f"{m}_low", f"{m}_high")}
                else:
                    d = diagnostic_at_threshold(y, p, float(threshold))
                for metric in ("sensitivity", "specificity", "ppv"):
                    row[f"{point}_{metric}"] = d[metric]
                    row[f"{point}_{metric}_low"] = d[f"{metric}_low"] if enough else math.nan
                    row[f"{point}_{metric}_high"] = d[f"{metric}_high"] if enough else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def render_shifted_scans(manifest: pd.DataFrame, rows, out_dir: str | Path, shift: dict = SHIFT) -> Path:
    """Re-render the synthetic patients at ``rows`` of ``manifest`` with the shifted scanner and write them, with a
    label-free ``manifest.csv`` (``patient_id``, absolute ``ct_path``), into a subfolder of ``out_dir`` named by the
    cohort's spec, the generator version and the shift (so a scan is reused only when all three are the same). Same generator seed and patient, so
    anatomy, phase, position, lesions and labels are the originals'; only the noise level differs. Returns the
    manifest path.

    Raises:
        XcardiaError: the manifest is not a synthetic cohort (a real cohort cannot be re-rendered).
    """
    from xcardia.cohort.describe import synthetic_spec
    from xcardia.cohort.generate import save_nifti
    from xcardia.cohort.physiology import patient_index, sample_patient
    from xcardia.cohort.render import render_ct
    from xcardia.errors import XcardiaError

    import hashlib
    import json

    from xcardia.cohort.generate import GENERATOR_VERSION

    spec = synthetic_spec(manifest)
    if spec is None:
        raise XcardiaError("a shifted-scanner render needs the synthetic cohort (its patients can be re-rendered); "
                           "on a real cohort, screen scans from the other scanner instead")
    # a scan already rendered is reused only for the same cohort, generator and shift: the folder is named by them
    key = hashlib.sha256(json.dumps([spec.to_json(), GENERATOR_VERSION, shift], sort_keys=True, default=str)
                         .encode()).hexdigest()[:16]
    out = Path(out_dir) / key
    (out / "ct").mkdir(parents=True, exist_ok=True)
    entries = []
    for r in rows:
        pid = str(manifest["patient_id"].iloc[int(r)])
        index = patient_index(pid)
        patient = sample_patient(spec.seed, index)
        anatomy = replace(patient.anatomy, noise_sd_hu=min(patient.anatomy.noise_sd_hu * shift["noise_factor"],
                                                           shift["noise_cap_hu"]))
        ct = render_ct(anatomy, spec.render, np.random.default_rng([spec.seed, index, 1]))
        path = out / "ct" / f"{pid}.nii.gz"
        if not path.exists():
            save_nifti(path, ct.hu, ct.affine)
        entries.append({"patient_id": pid, "ct_path": str(path)})
    manifest_path = out / "manifest.csv"
    pd.DataFrame(entries).to_csv(manifest_path, index=False)
    return manifest_path


def shift_table(labels: np.ndarray, risk_original: np.ndarray, risk_shifted: np.ndarray, n_boot: int = 200,
                seed: int = 0, tasks=LABELS) -> pd.DataFrame:
    """Per task, on the same patients: AUROC on the original and the shifted scans, their paired difference with a
    patient-bootstrap 95 % CI, and the calibration slope/intercept on each. Tasks with fewer than
    :data:`MIN_PER_CLASS` positives or negatives get no interval."""
    rows = []
    for t, task in enumerate(tasks):
        y = labels[:, t]
        n_pos, n_neg = int(np.nansum(y == 1)), int(np.nansum(y == 0))
        row = {"task": task, "n_pos": n_pos, "n_neg": n_neg, "auroc_original": auroc(y, risk_original[:, t]),
               "auroc_shifted": auroc(y, risk_shifted[:, t])}
        if n_pos >= MIN_PER_CLASS and n_neg >= MIN_PER_CLASS:
            d = paired_bootstrap_difference(y, risk_shifted[:, t], risk_original[:, t], n_boot=n_boot, seed=seed)
            row.update(difference=d["difference"], difference_low=d["ci_low"], difference_high=d["ci_high"],
                       interval="yes")
        else:
            row.update(difference=row["auroc_shifted"] - row["auroc_original"], difference_low=math.nan,
                       difference_high=math.nan, interval="too small for an interval")
        for name, r in (("original", risk_original[:, t]), ("shifted", risk_shifted[:, t])):
            slope, intercept = calibration_slope_intercept(y, r)
            row[f"calibration_slope_{name}"], row[f"calibration_intercept_{name}"] = slope, intercept
        rows.append(row)
    return pd.DataFrame(rows)

