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
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


from xcardia.data.checks import (  # noqa: F401 - re-exported: validate is where users look for them
    ALIAS_SETS,
    PAPER_ALIASES,
    Problem,
    apply_aliases,
    cell_problems,
    detect_aliases,
    normalise_manifest,
)
from xcardia.errors import XcardiaError
from xcardia.schema import COLUMN_BY_NAME, REQUIRED_COLUMNS

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


def validate_manifest(path: str | os.PathLike, deep: bool = False, aliases: str | dict | None = None,
                      npy_spacing_mm: float | None = None, preprocess: dict | None = None) -> ValidationReport:
    """Check a manifest and every file it points to; report all problems.

    Args:
        path: ``manifest.csv`` or a cohort folder holding one.
        deep: read every voxel of every CT (NaNs, constant volumes, unrescaled values) instead of headers only.
        aliases: ``"paper"`` to accept the paper's column names.
        npy_spacing_mm: spacing of ``.npy`` volumes without an ``npy_spacing_mm`` cell.
        preprocess: target geometry (``shape``, ``spacing_mm``) the field-of-view check compares against.
    """
    from xcardia.data.imaging import PreprocessSpec
    from xcardia.data.manifest import manifest_file, read_manifest_text

    p = manifest_file(path)
    report = ValidationReport(manifest=str(p))
    try:
        raw = read_manifest_text(p)
    except XcardiaError as exc:
        report.problems.append(Problem("error", str(exc).split(": ", 1)[-1]))
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

    if raw.empty:
        report.problems.append(Problem("error", "the manifest has a header but no patient rows"))
        return report
    report.problems += cell_problems(raw, check_files=True, root=p.parent, deep=deep,
                                     spec=PreprocessSpec(npy_spacing_mm=npy_spacing_mm, **(preprocess or {})))
    return report


def write_report(report: ValidationReport, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")

