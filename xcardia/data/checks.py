"""Cell-level checks of a manifest, column aliases and normalisation: what every command applies when it reads a
manifest (:func:`xcardia.data.manifest.load_manifest`) and what ``validate`` reports. A leaf of ``xcardia.data``:
it imports neither the manifest reader nor the report.
"""

from __future__ import annotations

import os

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from xcardia.errors import XcardiaError
from xcardia.schema import COLUMN_BY_NAME, SPLITS

#: Column names of the paper's public code (and EchoNext's label names) → this project's schema.
PAPER_ALIASES: dict[str, str] = {
    "Path": "ct_path",
    "Patients_Age": "age_years",
    "Patients_Sex": "sex",
    "ECHO_lvef_value": "lvef_percent",
    "ivs_measurement": "ivsd_cm",
    "lvpw_measurement": "lvpwd_cm",
    "lv_d_measurement": "lvidd_cm",
    "lv_s_measurement": "lvids_cm",
    "e_wave_velocity": "mv_e_velocity_cm_s",
    "a_wave_velocity": "mv_a_velocity_cm_s",
    "e_a_ratio": "mv_e_a_ratio",
    "ECHO_mv_dti_e_prime_medial": "e_prime_septal_cm_s",
    "ECHO_mv_dti_e_prime_lateral": "e_prime_lateral_cm_s",
    "ECHO_mv_dti_e_prime_avg": "e_prime_mean_cm_s",
    "ECHO_lvot_diameter_value": "lvot_diameter_cm",
    "ECHO_lvot_vti_value": "lvot_vti_cm",
    "ECHO_av_peak_velocity": "av_peak_velocity_m_s",
    "ECHO_av_peak_gradient": "av_peak_gradient_mmhg",
    "ECHO_av_mean_gradient": "av_mean_gradient_mmhg",
    "ECHO_tr_max_velocity_value": "tr_max_velocity_m_s",
    "ECHO_rap_value": "rap_mmhg",
    "ECHO_pasp_value": "pasp_mmhg",
    "ECHO_pericardial_effusion_value": "pericardial_effusion",
    "ECHO_pasp_less_rap_value": "pasp_minus_rap_mmhg",
    "ECHO_lvot_area_value": "lvot_area_cm2",
    "ECHO_lvot_vmax_value": "lvot_peak_velocity_m_s",
    "ECHO_mr_vti": "mr_vti_cm",
    "ECHO_mr_peak_velocity": "mr_peak_velocity_m_s",
    "ECHO_mv_dti_a_prime_lateral": "a_prime_lateral_cm_s",
    "ECHO_mv_dti_a_prime_medial": "a_prime_septal_cm_s",
    "ECHO_av_vti": "av_vti_cm",
    "ventricular_rate": "ventricular_rate_bpm",
    "atrial_rate": "atrial_rate_bpm",
    "pr_interval": "pr_interval_ms",
    "qrs_duration": "qrs_duration_ms",
    "qt_inverval": "qt_interval_ms",
    "qt_corrected": "qtc_ms",
    "ventricular_pacing_flag": "ecg_paced_flag",
    "aortic_stenosis_moderate_or_greater_flag": "aortic_stenosis_moderate_severe_flag",
    "aortic_regurgitation_moderate_or_greater_flag": "aortic_regurgitation_moderate_severe_flag",
    "mitral_regurgitation_moderate_or_greater_flag": "mitral_regurgitation_moderate_severe_flag",
    "tricuspid_regurgitation_moderate_or_greater_flag": "tricuspid_regurgitation_moderate_severe_flag",
    "pulmonary_regurgitation_moderate_or_greater_flag": "pulmonary_regurgitation_moderate_severe_flag",
    "shd_moderate_or_greater_flag": "shd_flag",
}
ALIAS_SETS = {"paper": PAPER_ALIASES}

#: Severity words the paper's label columns use, read as flags. ``presumed none`` and ``trace`` are negatives here;
#: the public reader (``Finetuning.py:223``, ``:275``) makes both a missing label (register D13).
LABEL_WORDS: dict[str, float] = {"none": 0.0, "presumed none": 0.0, "trace": 0.0, "mild": 0.0,
                                 "moderate": 1.0, "severe": 1.0}
SEX_WORDS = {"m": "M", "male": "M", "f": "F", "female": "F"}
GRADE_WORDS = {"presumed none": "none"}


@dataclass
class Problem:
    """One finding. ``row`` is 1-based over data rows (None for the whole file)."""

    severity: str
    message: str
    row: int | None = None
    patient_id: str | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (patient {self.patient_id})" if self.patient_id else ""))
        if self.column:
            where.append(f"column {self.column}")
        return f"{self.severity}: " + (", ".join(where) + ": " if where else "") + self.message


def apply_aliases(columns: list[str], aliases: str | dict | None) -> tuple[dict[str, str], list[Problem]]:
    """Renaming map for ``columns`` under an alias set; a clash (alias and target both present) is an error."""
    if aliases is None:
        return {}, []
    table = ALIAS_SETS.get(aliases) if isinstance(aliases, str) else aliases
    if table is None:
        raise XcardiaError(f"unknown alias set {aliases!r}; available: {', '.join(ALIAS_SETS)}")
    mapping, problems = {}, []
    for col in columns:
        if col in table:
            target = table[col]
            if target in columns:
                problems.append(Problem("error", f"both {col} and {target} are present; keep one", column=col))
            else:
                mapping[col] = target
    return mapping, problems


def detect_aliases(columns: list[str]) -> str | None:
    """``"paper"`` when the manifest uses the paper's column names (e.g. ``Path`` instead of ``ct_path``)."""
    if "ct_path" not in columns and "Path" in columns:
        return "paper"
    return "paper" if sum(c in PAPER_ALIASES for c in columns) >= 3 else None


def _check_number(text: str, col) -> tuple[float | None, str | None]:
    try:
        value = float(text)
    except ValueError:
        return None, f"{text!r} is not a number; write the value in {col.unit or 'the column unit'} or leave it empty"
    if math.isnan(value) or math.isinf(value):
        return None, f"{text!r} is not a finite number; leave the cell empty for a missing value"
    if col.plausible and not (col.plausible[0] <= value <= col.plausible[1]):
        for factor, wrong_unit in col.unit_mistakes:
            if col.plausible[0] <= value * factor <= col.plausible[1]:
                return value, (f"value {value:g} looks like {wrong_unit} (→ {value * factor:g} {col.unit}); "
                               f"convert the column to {col.unit}")
        return value, f"value {value:g} is outside the plausible range {col.plausible[0]:g}–{col.plausible[1]:g} {col.unit}"
    return value, None


def _check_cell(col, text: str) -> str | None:
    """Problem message for one non-empty cell, or None."""
    word = text.strip().lower()
    if col.kind == "float":
        return _check_number(text, col)[1]
    if col.kind == "flag":
        if word in ("0", "1", "0.0", "1.0"):
            return None
        if col.group == "label" and word in LABEL_WORDS:
            return None
        allowed = "1, 0 or empty" + (" (or none/mild/moderate/severe/presumed none)" if col.group == "label" else "")
        return f"value {text!r} is not a flag; use {allowed}"
    if col.kind == "category":
        if col.name == "sex":
            return None if word in SEX_WORDS else f"value {text!r}: write M or F (numeric sex codes are ambiguous)"
        if col.name == "split":
            return None if text in SPLITS else f"value {text!r}: split must be one of {', '.join(SPLITS)}"
        if word in col.categories or GRADE_WORDS.get(word) in col.categories:
            return None
        return f"value {text!r} is not one of {', '.join(col.categories)}"
    return None


def cell_problems(raw: pd.DataFrame, check_files: bool = False, root: Path | None = None, deep: bool = False,
                  spec=None) -> list[Problem]:
    """Every problem of the rows of a manifest read as strings (aliases applied): identifiers, splits, ranges,
    flags, categories and — with ``check_files`` — the files and their geometry. What ``validate`` reports and
    what every command refuses to load."""
    from xcardia.data.imaging import geometry_problems, read_header

    problems: list[Problem] = []
    seen: dict[str, tuple[int, str]] = {}
    seen_folded: dict[str, tuple[int, str]] = {}
    ct_seen: dict[str, tuple[int, str]] = {}
    content_seen: dict[str, tuple[int, str]] = {}
    checked_columns = [c for c in raw.columns if c in COLUMN_BY_NAME and COLUMN_BY_NAME[c].group != "id"]
    for i, row in enumerate(raw.itertuples(index=False), start=1):
        cells = dict(zip(raw.columns, row))
        pid = cells.get("patient_id", "").strip()
        add = lambda msg, col=None, sev="error": problems.append(Problem(sev, msg, i, pid or None, col))  # noqa: E731
        if "patient_id" not in cells:
            break
        if not pid:
            add("empty patient_id", "patient_id")
        elif pid in seen:
            first_row, first_split = seen[pid]
            split = cells.get("split", "")
            if split and first_split and split != first_split:
                add(f"patient is in two splits ({first_split} in row {first_row}, {split} here); "
                    f"splits must be patient-level", "split")
            else:
                add(f"duplicate patient_id (first in row {first_row}); one row per patient", "patient_id")
        else:
            seen[pid] = (i, cells.get("split", ""))
            folded = pid.casefold()
            if folded in seen_folded:
                add(f"patient_id differs only in case from {seen_folded[folded][1]!r} (row {seen_folded[folded][0]}); "
                    f"the same patient twice would leak between splits — give one id per patient", "patient_id")
            else:
                seen_folded[folded] = (i, pid)
        ct = cells.get("ct_path", "").strip()
        if ct:  # the same CT under two rows (two ids, or two splits): leakage (issue 22)
            key = os.path.normcase(os.path.normpath(ct)).casefold()
            if key in ct_seen:
                add(f"the same CT file as row {ct_seen[key][0]} (patient {ct_seen[key][1]}); one CT per patient, "
                    f"or the model is tested on images it trained on", "ct_path")
            else:
                ct_seen[key] = (i, pid)
        if "split" in cells:
            message = _check_cell(COLUMN_BY_NAME["split"], cells["split"]) if cells["split"] else "empty split"
            if message:
                add(message, "split")
        for col in checked_columns:
            text = cells[col]
            if text.strip() == "":
                continue
            message = _check_cell(COLUMN_BY_NAME[col], text)
            if message:
                add(message, col)
        if not check_files:
            continue
        for path_col in ("ct_path", "labelmap_path", "heart_mask_path"):
            value = cells.get(path_col, "")
            if path_col not in cells or (not value and path_col != "ct_path"):
                continue
            if not value:
                add("empty path", path_col)
                continue
            target = Path(value) if Path(value).is_absolute() else root / value
            if not target.exists():
                add(f"{value!r} does not exist (relative paths are relative to {root})", path_col)
                continue
            row_spec = spec
            npy = cells.get("npy_spacing_mm", "").strip()
            if npy and _check_number(npy, COLUMN_BY_NAME["npy_spacing_mm"])[1] is None:
                row_spec = replace(spec, npy_spacing_mm=float(npy))
            if path_col == "ct_path":  # the same image under another name (a copied file): leakage too
                from xcardia.data.identity import image_identity

                identity = image_identity(target)
                if identity in content_seen:
                    add(f"{value!r} has the same content as row {content_seen[identity][0]}'s CT (patient "
                        f"{content_seen[identity][1]}); one CT per patient", path_col)
                else:
                    content_seen[identity] = (i, pid)
            try:
                if deep and path_col == "ct_path":
                    for severity, check, message in deep_series_problems(target, row_spec):
                        add(f"{value}: {check}: {message}", path_col, severity)
                else:
                    header = read_header(target)
                    spacing = header["spacing"] if header["kind"] != "npy" else (
                        (row_spec.npy_spacing_mm,) * 3 if row_spec.npy_spacing_mm else ())
                    for severity, message in geometry_problems(header["shape"], spacing, row_spec):
                        add(f"{value}: {message}", path_col, severity)
            except XcardiaError as exc:
                add(str(exc), path_col)
    return problems


def normalise_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Bring a manifest read as strings/numbers into the schema's form: sex M/F, grades as schema words, label
    severity words as 1/0, numeric columns as floats (a non-numeric cell raises: run ``validate`` first)."""
    out = df.copy()
    for col in out.columns:
        spec = COLUMN_BY_NAME.get(col)
        if spec is None or spec.group == "id":
            continue
        values = out[col]
        if spec.kind == "category":
            def norm(v, spec=spec):
                if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
                    return None
                word = str(v).strip().lower()
                if spec.name == "sex":
                    return SEX_WORDS.get(word, str(v))
                return GRADE_WORDS.get(word, word)
            out[col] = values.map(norm)
        elif spec.kind in ("float", "flag"):
            def to_float(v, spec=spec, col=col):
                if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
                    return math.nan
                word = str(v).strip().lower()
                if spec.group == "label" and word in LABEL_WORDS:
                    return LABEL_WORDS[word]
                try:
                    return float(v)
                except ValueError:
                    raise XcardiaError(f"column {col}: {v!r} is not a number; run `python -m xcardia validate` "
                                       f"on the manifest for every such problem") from None
            out[col] = values.map(to_float).astype(float)
    return out


def deep_series_problems(path: Path, spec) -> list[tuple[str, str, str]]:
    """``validate --deep`` for one CT: every voxel read (NaN, constant, unrescaled), then the radiological series
    checks of :mod:`xcardia.data.qc` on the voxels and, for a DICOM folder, on its headers."""
    from monai.transforms import Orientation

    from xcardia.data.imaging import load_ct
    from xcardia.data.qc import dicom_series_qc, series_qc

    img = load_ct(path, spec)  # raises XcardiaError for unreadable / NaN / constant / unrescaled volumes
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    spacing = tuple(float(abs(z)) for z in img.pixdim)
    findings = series_qc(img.as_tensor().numpy()[0], spacing)
    if path.is_dir():
        import pydicom

        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(path.iterdir()) if f.is_file()]
        findings += dicom_series_qc(headers)
    return findings
