"""Reading a cohort manifest (``manifest.csv``: one row per patient) and locating or generating a cohort.

The schema is in :mod:`xcardia.cohort.schema` and ``data_cards/manifest_schema.md``; full checking of a manifest
(ranges, units, files) is :func:`xcardia.data.validate.validate_manifest`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from xcardia.cohort.generate import COMPLETE_MARKER, PARTIAL_MARKER, generate_cohort
from xcardia.cohort.schema import COLUMN_BY_NAME, REQUIRED_COLUMNS
from xcardia.errors import XcardiaError

_TEXT_COLUMNS = [c.name for c in COLUMN_BY_NAME.values() if c.kind in ("text", "category")]


def manifest_file(path: str | os.PathLike) -> Path:
    """The manifest CSV for ``path``: the file itself, or ``manifest.csv`` inside a cohort folder."""
    p = Path(path)
    if p.is_dir():
        if (p / PARTIAL_MARKER).exists() and not (p / COMPLETE_MARKER).exists():
            raise XcardiaError(f"{p} holds an unfinished cohort generation; rerun the same generate command to finish it")
        p = p / "manifest.csv"
    if not p.exists():
        raise XcardiaError(f"manifest {p} does not exist; pass a manifest.csv or a cohort folder that contains one")
    return p


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest in the schema's form: numbers as floats (missing = NaN), identifiers and categories as text
    (missing = None), label severity words as 1/0. The paper's column names are recognised and mapped.

    The returned frame has ``attrs["root"]`` (the folder that relative paths are relative to), ``attrs["path"]`` and
    ``attrs["column_mapping"]`` (paper name → schema name, empty for a native manifest).

    Raises:
        XcardiaError: the file is missing or unreadable, a required column is missing, patient ids repeat, or a
            numeric cell is not a number (``python -m xcardia validate`` lists every such problem).
    """
    from xcardia.data.validate import apply_aliases, detect_aliases, normalise_manifest

    p = manifest_file(path)
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise XcardiaError(f"{p}: not a readable CSV manifest ({exc})") from exc
    mapping, clashes = apply_aliases(list(raw.columns), detect_aliases(list(raw.columns)))
    if clashes:
        raise XcardiaError(f"{p}: {clashes[0]}")
    raw = raw.rename(columns=mapping)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise XcardiaError(f"{p}: required column(s) {', '.join(missing)} missing; see data_cards/manifest_schema.md")
    for c in raw.columns:
        if c in _TEXT_COLUMNS or c not in COLUMN_BY_NAME:
            raw[c] = raw[c].map(lambda v: v if v.strip() != "" else None).astype(object)
    df = normalise_manifest(raw)
    duplicated = df["patient_id"][df["patient_id"].duplicated()].tolist()
    if duplicated:
        raise XcardiaError(f"{p}: duplicate patient_id values {duplicated[:5]}; each patient needs exactly one row")
    df.attrs["root"] = str(p.parent.resolve())
    df.attrs["path"] = str(p.resolve())
    df.attrs["column_mapping"] = mapping
    return df


def resolve_ct_path(manifest: pd.DataFrame, value: str) -> Path:
    """Absolute path of a manifest path cell (relative paths are relative to the manifest's folder)."""
    path = Path(value)
    return path if path.is_absolute() else Path(manifest.attrs["root"]) / path


def prepare_cohort(profile, data: str | os.PathLike | None, output_dir: str | os.PathLike, progress: bool = True) -> Path:
    """The manifest a notebook or command should use.

    Args:
        profile: a :class:`xcardia.config.Profile`.
        data: a real (or previously generated) manifest or cohort folder; None generates the profile's synthetic
            cohort under ``output_dir/cohort`` (or reuses it when it is already there and complete).
        output_dir: the reproduction's output folder.
        progress: show generation progress.
    """
    if data is not None:
        return manifest_file(data)
    return generate_cohort(Path(output_dir) / "cohort", profile.cohort, workers=profile.generate_workers, progress=progress)
