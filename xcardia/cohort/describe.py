"""Tables that describe a cohort (synthetic or real): splits, prevalences, missingness, gallery picks, CT
measurements. Aggregates only — nothing here returns a patient identifier of a real cohort."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from xcardia.cohort.generate import CohortSpec
from xcardia.data.manifest import COMPLETE_MARKER
from xcardia.cohort.measure import ct_measurements
from xcardia.cohort.physiology import patient_index, sample_patient
from xcardia.cohort.render import HEART_LABELS, STRUCTURES, RenderedCT, render_ct
from xcardia.schema import COLUMN_BY_NAME, ECHONEXT_PREVALENCE, LABEL_SHORT, LABELS, SPLITS, columns_in_group
from xcardia.data.manifest import resolve_ct_path

#: Published CT-only detection of reduced LVEF (< 50 %) on non-contrast / non-gated CT: the AUROC range the cohort's
#: difficulty is calibrated toward (sources: ``data_cards/synthetic_cohort.md``).
LITERATURE_CT_LVEF_AUROC = (0.76, 0.79)


def synthetic_spec(manifest: pd.DataFrame) -> CohortSpec | None:
    """The generator spec of a synthetic cohort (from ``cohort.json`` beside the manifest); None for a real cohort."""
    meta = Path(manifest.attrs["root"]) / COMPLETE_MARKER
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return CohortSpec.from_json(info["spec"]) if info.get("generator") == "xcardia.cohort" else None


def split_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patients per split with age (mean ± SD) and the share of men."""
    rows = []
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        row = {"split": split, "patients": len(part)}
        if "age_years" in part:
            row["age_mean"] = round(float(part["age_years"].mean()), 1) if len(part) else math.nan
            row["age_sd"] = round(float(part["age_years"].std()), 1) if len(part) > 1 else math.nan
        if "sex" in part:
            row["male_share"] = round(float((part["sex"] == "M").mean()), 3) if len(part) else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def prevalence_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per task: labelled patients, positives, prevalence, the EchoNext reference and their ratio."""
    rows = []
    for task in LABELS:
        if task not in manifest:
            continue
        y = manifest[task]
        n = int(y.notna().sum())
        pos = int((y == 1).sum())
        prev = pos / n if n else math.nan
        ref = ECHONEXT_PREVALENCE[task]
        rows.append({"task": task, "short": LABEL_SHORT[task], "labelled": n, "positives": pos,
                     "prevalence": round(prev, 4), "echonext": ref, "ratio": round(prev / ref, 2)})
    return pd.DataFrame(rows).set_index("task")


def missingness_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Share of missing values per ECHO/ECG/label/concept column, overall and in atrial fibrillation."""
    cols = [c for c in columns_in_group("echo", "ecg", "label", "concept") if c in manifest]
    out = pd.DataFrame({"missing": manifest[cols].isna().mean()})
    if "ecg_af_flag" in manifest:
        af = manifest["ecg_af_flag"] == 1
        out["missing_in_af"] = manifest.loc[af, cols].isna().mean()
        out["missing_in_sinus"] = manifest.loc[~af, cols].isna().mean()
    return out.round(3)


def gallery_picks(manifest: pd.DataFrame) -> dict[str, int]:
    """Row positions of typical patients: normal heart, LVH, dilated LV, pericardial effusion, aortic-valve calcium.

    Each pick is the first patient (in manifest order) meeting its criteria and not already picked.
    """
    m = manifest
    num = lambda c: pd.to_numeric(m[c], errors="coerce") if c in m else pd.Series(np.nan, index=m.index)  # noqa: E731
    effusion = m["pericardial_effusion"].isin(["moderate", "large"]) if "pericardial_effusion" in m else False
    criteria = {
        "normal heart": (num("shd_flag") == 0) & num("lvidd_cm").between(4.2, 5.2) & (num("ivsd_cm") < 1.0),
        "LV hypertrophy": (num("ivsd_cm") >= 1.5) & (num("av_peak_velocity_m_s") < 2.5),
        "dilated LV": num("lvidd_cm") >= 6.5,
        "pericardial effusion": effusion,
        "aortic-valve calcium": num("av_peak_velocity_m_s") >= 4.0,
    }
    picks: dict[str, int] = {}
    for name, mask in criteria.items():
        hits = [int(i) for i in np.flatnonzero(np.asarray(mask, dtype=bool)) if int(i) not in picks.values()]
        if hits:
            picks[name] = hits[0]
    return picks


def gallery_volumes(manifest: pd.DataFrame, picks: dict[str, int]) -> dict[str, tuple[np.ndarray, tuple[int, int, int]]]:
    """HU volume and the voxel to slice through for each pick: the heart's centre, or the valve calcium for the
    aortic-valve pick (from the label map)."""
    out = {}
    for name, row in picks.items():
        hu, _ = load_volume(manifest, row)
        lab, _ = load_volume(manifest, row, "labelmap_path")
        focus = np.isin(lab, HEART_LABELS)
        if "calcium" in name and (lab == STRUCTURES["valve_calcium"]).any():
            focus = lab == STRUCTURES["valve_calcium"]
        centre = tuple(int(round(v)) for v in np.argwhere(focus).mean(axis=0)) if focus.any() else tuple(s // 2 for s in hu.shape)
        out[name] = (hu, centre)
    return out


def load_volume(manifest: pd.DataFrame, row: int, column: str = "ct_path") -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a NIfTI referenced by ``column`` in row ``row``."""
    img = nib.load(str(resolve_ct_path(manifest, manifest[column].iloc[row])))
    return np.asarray(img.dataobj), img.affine


def ct_measurement_frame(manifest: pd.DataFrame, max_patients: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Label-map CT measurements (:func:`xcardia.cohort.measure.ct_measurements`) for every patient with a label
    map (or a seeded random subset of ``max_patients``), indexed like ``manifest``."""
    if "labelmap_path" not in manifest:
        return pd.DataFrame(index=manifest.index[:0])
    rows = manifest.index[manifest["labelmap_path"].notna()]
    if max_patients is not None and len(rows) > max_patients:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_patients, replace=False))
    records = {}
    for idx in rows:
        img = nib.load(str(resolve_ct_path(manifest, manifest.at[idx, "labelmap_path"])))
        records[idx] = ct_measurements(np.asarray(img.dataobj), img.header.get_zooms()[:3])
    return pd.DataFrame.from_dict(records, orient="index")


def hu_by_structure(manifest: pd.DataFrame, structures: dict[str, int], n_patients: int = 20,
                    voxels_per_structure: int = 400, seed: int = 0) -> pd.DataFrame:
    """Long table (structure, hu) of voxels sampled from the label maps of ``n_patients`` random patients."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(manifest["labelmap_path"].notna().to_numpy()) if "labelmap_path" in manifest else []
    if len(rows) == 0:
        return pd.DataFrame(columns=["structure", "hu"])
    chosen = rng.choice(rows, size=min(n_patients, len(rows)), replace=False)
    parts = []
    for row in sorted(chosen):
        hu, _ = load_volume(manifest, int(row), "ct_path")
        lab, _ = load_volume(manifest, int(row), "labelmap_path")
        for name, value in structures.items():
            values = hu[lab == value]
            if values.size:
                take = rng.choice(values, size=min(voxels_per_structure, values.size), replace=False)
                parts.append(pd.DataFrame({"structure": name, "hu": take.astype(float)}))
    return pd.concat(parts, ignore_index=True)


def render_at_phases(spec: CohortSpec, pid: str, phases: tuple[float, ...]) -> list[RenderedCT]:
    """The same synthetic patient rendered at several cardiac phases (same position, noise and lesions)."""
    index = patient_index(pid)
    patient = sample_patient(spec.seed, index)
    return [render_ct(replace(patient.anatomy, phase=p), spec.render, np.random.default_rng([spec.seed, index, 1]))
            for p in phases]


def phenotype_columns() -> list[str]:
    """The main continuous ECHO/ECG phenotypes shown in distribution plots and correlation maps."""
    return [c for c in columns_in_group("demographics", "echo", "ecg")
            if COLUMN_BY_NAME[c].kind == "float" and c not in ("lv_edv_ml", "lv_esv_ml", "e_prime_mean_cm_s")]


def tabular_concept_auroc(manifest: pd.DataFrame, column_sets: dict[str, tuple[str, ...]], seed: int = 0) -> pd.DataFrame:
    """How much of each NW concept (and the mean) the tabular inputs alone reveal: an L2 logistic regression
    (median imputation with missing indicators, standardised) fitted on the ``pretrain`` split, AUROC on ``val`` and
    ``test``. One row per column set, one column per concept. A high value means the tabular tower can satisfy the
    NW loss without the image encoder (why the default inputs are the paper's, not every column)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from xcardia.schema import CONCEPTS
    from xcardia.models.tabular_encoder import TabularPreprocessor

    split = manifest["split"].astype(str)
    fit_rows = (split == "pretrain").to_numpy()
    score_rows = split.isin(("val", "test")).to_numpy()
    out = []
    for name, columns in column_sets.items():
        x = TabularPreprocessor(tuple(columns), "token").raw(manifest)
        row = {"inputs": name, "n_columns": len(columns)}
        for concept in CONCEPTS:
            if concept not in manifest:  # a real cohort may not carry the concept columns
                row[concept] = math.nan
                continue
            y = pd.to_numeric(manifest[concept], errors="coerce").to_numpy()
            fit, score = fit_rows & ~np.isnan(y), score_rows & ~np.isnan(y)
            if len(np.unique(y[fit])) < 2 or len(np.unique(y[score])) < 2:
                row[concept] = math.nan
                continue
            model = make_pipeline(SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
                                  StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
            model.fit(x[fit], y[fit].astype(int))
            row[concept] = float(roc_auc_score(y[score].astype(int), model.predict_proba(x[score])[:, 1]))
        scored = [row[c] for c in CONCEPTS if not math.isnan(row[c])]
        row["mean"] = float(np.mean(scored)) if scored else math.nan
        out.append(row)
    return pd.DataFrame(out)
