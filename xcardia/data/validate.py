"""Validate a cohort manifest before anything trains on it, reporting every problem at once.

``python -m xcardia validate MANIFEST [--deep] [--aliases paper] [--report report.json]`` and
:func:`validate_manifest`. Each problem names the row (1-based, header excluded; the CSV line is row + 1), the
patient and the column, and says what to do. Unit mistakes are recognised and named (LVIDd 45 looks like mm; LVEF
0.55 looks like a fraction).

``aliases="paper"`` accepts the column names of the paper's public code (``ECHO_lvef_value``, ``ivs_measurement``,
``lv_d_measurement``, ``qt_inverval``, ``Path``, …) and EchoNext's label names, and reports the mapping.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from xcardia.cohort.schema import COLUMN_BY_NAME, REQUIRED_COLUMNS, SPLITS
from xcardia.errors import XcardiaError

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

#: Severity words the paper's label columns use, read as flags.
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


@dataclass
class ValidationReport:
    manifest: str
    n_rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    column_mapping: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"manifest": self.manifest, "rows": self.n_rows, "ok": self.ok, "n_errors": len(self.errors),
                "n_warnings": len(self.warnings), "column_mapping": self.column_mapping,
                "problems": [asdict(p) for p in self.problems]}

    def to_text(self) -> str:
        head = (f"{self.manifest}: {self.n_rows} rows, {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        mapping = [f"mapped column {k} -> {v}" for k, v in self.column_mapping.items()]
        return "\n".join([head, *mapping, *map(str, self.problems)])


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


def validate_manifest(path: str | os.PathLike, deep: bool = False, aliases: str | dict | None = None,
                      npy_spacing_mm: float | None = None) -> ValidationReport:
    """Check a manifest and every file it points to; report all problems.

    Args:
        path: ``manifest.csv`` or a cohort folder holding one.
        deep: read every voxel of every CT (NaNs, constant volumes, unrescaled values) instead of headers only.
        aliases: ``"paper"`` to accept the paper's column names.
        npy_spacing_mm: spacing of ``.npy`` volumes (needed for ``deep`` checks of them).
    """
    from xcardia.data.imaging import PreprocessSpec, load_ct, read_header
    from xcardia.data.manifest import manifest_file

    p = manifest_file(path)
    report = ValidationReport(manifest=str(p))
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        report.problems.append(Problem("error", f"not a readable CSV ({exc})"))
        return report
    report.n_rows = len(raw)
    mapping, problems = apply_aliases(list(raw.columns), aliases)
    report.column_mapping = mapping
    report.problems += problems
    raw = raw.rename(columns=mapping)
    for col in REQUIRED_COLUMNS:
        if col not in raw.columns:
            hint = " (the paper's names? try --aliases paper)" if aliases is None and detect_aliases(list(raw.columns)) else ""
            report.problems.append(Problem("error", f"required column missing{hint}", column=col))
    for col in raw.columns:
        if col not in COLUMN_BY_NAME:
            report.problems.append(Problem("warning", "unknown column: kept, but no model uses it", column=col))
    if "patient_id" not in raw.columns:
        return report

    seen: dict[str, tuple[int, str]] = {}
    spec = PreprocessSpec(npy_spacing_mm=npy_spacing_mm)
    root = p.parent
    checked_columns = [c for c in raw.columns if c in COLUMN_BY_NAME and COLUMN_BY_NAME[c].group != "id"]
    for i, row in enumerate(raw.itertuples(index=False), start=1):
        cells = dict(zip(raw.columns, row))
        pid = cells["patient_id"].strip()
        add = lambda msg, col=None, sev="error": report.problems.append(Problem(sev, msg, i, pid or None, col))  # noqa: E731
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
        if "split" in cells:
            message = _check_cell(COLUMN_BY_NAME["split"], cells["split"]) if cells["split"] else "empty split"
            if message:
                add(message, "split")
        for path_col in ("ct_path", "labelmap_path"):
            value = cells.get(path_col, "")
            if path_col not in cells or (not value and path_col == "labelmap_path"):
                continue
            if not value:
                add("empty path", path_col)
                continue
            target = Path(value) if Path(value).is_absolute() else root / value
            if not target.exists():
                add(f"{value!r} does not exist (relative paths are relative to {root})", path_col)
                continue
            try:
                if deep and path_col == "ct_path":
                    load_ct(target, spec)
                else:
                    read_header(target)
            except XcardiaError as exc:
                add(str(exc), path_col)
        for col in checked_columns:
            text = cells[col]
            if text.strip() == "":
                continue
            message = _check_cell(COLUMN_BY_NAME[col], text)
            if message:
                add(message, col)
    return report


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


def write_report(report: ValidationReport, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")

