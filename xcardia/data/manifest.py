"""Reading a cohort manifest (``manifest.csv``: one row per patient) and locating or generating a cohort.

The schema is in :mod:`xcardia.schema` and ``data_cards/manifest_schema.md``; full checking of a manifest
(ranges, units, files) is :func:`xcardia.data.validate.validate_manifest`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from xcardia.schema import COLUMN_BY_NAME, REQUIRED_COLUMNS
from xcardia.data.checks import apply_aliases, cell_problems, detect_aliases, normalise_manifest
from xcardia.errors import XcardiaError

#: A cohort folder's markers: complete (its spec and generator version) and a generation still under way.
COMPLETE_MARKER = "cohort.json"
PARTIAL_MARKER = ".generating.json"

_TEXT_COLUMNS = [c.name for c in COLUMN_BY_NAME.values() if c.kind in ("text", "category")]


def manifest_file(path: str | os.PathLike) -> Path:
    """The manifest CSV for ``path``: the file itself, or ``manifest.csv`` inside a cohort folder."""
    p = Path(path)
    if p.is_dir():
        if (p / PARTIAL_MARKER).exists() and not (p / COMPLETE_MARKER).exists():
            raise XcardiaError(f"{p} holds an unfinished cohort generation; rerun the same generate command to finish it")
        images = [f for f in p.iterdir() if f.name.lower().endswith((".nii", ".nii.gz", ".npy", ".dcm"))]
        p = p / "manifest.csv"
        if not p.exists() and images:
            raise XcardiaError(f"{p.parent} holds {len(images)} image file(s) but no manifest.csv; write a manifest "
                               f"(one row per patient: patient_id, ct_path, split, phenotypes, labels — see "
                               f"data_cards/manifest_schema.md) and pass it")
    if not p.exists():
        raise XcardiaError(f"manifest {p} does not exist; pass a manifest.csv or a cohort folder that contains one")
    if p.is_dir():
        raise XcardiaError(f"{p} is a folder without manifest.csv; pass a manifest.csv or a cohort folder")
    if not p.is_file():  # a FIFO or a device would block or never end
        raise XcardiaError(f"manifest {p} is not a regular file (a pipe or a device?); pass a manifest.csv file")
    return p


def read_manifest_text(p: Path) -> pd.DataFrame:
    """The manifest's cells as strings, or a clear error for the usual export mistakes (encoding, separator)."""
    with open(p, "rb") as handle:
        head = handle.read(4096)
    utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        len(head) > 8 and (head[1::2].count(0) > 0.4 * len(head[1::2]) or head[0::2].count(0) > 0.4 * len(head[0::2])))
    if utf16:  # a BOM, or every other byte NUL: UTF-16 text
        raise XcardiaError(f"{p}: the file is UTF-16 (a spreadsheet's 'Unicode text' export); save it as CSV UTF-8")
    if b"\x00" in head:
        raise XcardiaError(f"{p}: the file holds NUL bytes at byte {head.index(0)} (binary data, or a damaged file); "
                           f"pass the manifest CSV as text")
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise XcardiaError(f"{p}: not UTF-8 text; save the manifest as CSV UTF-8") from None
    except pd.errors.EmptyDataError:
        raise XcardiaError(f"{p}: the file is empty; a manifest needs a header row and one row per patient") from None
    except pd.errors.ParserError as exc:
        raise XcardiaError(f"{p}: not a readable CSV manifest ({exc}); check the quoting") from None
    if len(raw.columns) == 1 and ";" in raw.columns[0]:
        raise XcardiaError(f"{p}: the columns are separated by ';' (a European spreadsheet export); save it with ',' "
                           f"as the separator")
    return raw


def load_manifest(path: str | os.PathLike, check: bool = True) -> pd.DataFrame:
    """Read a manifest in the schema's form: numbers as floats (missing = NaN), identifiers and categories as text
    (missing = None), label severity words as 1/0. The paper's column names are recognised and mapped.

    The returned frame has ``attrs["root"]`` (the folder that relative paths are relative to), ``attrs["path"]`` and
    ``attrs["column_mapping"]`` (paper name → schema name, empty for a native manifest).

    Raises:
        XcardiaError: the file is missing or unreadable, a required column is missing, patient ids repeat, or a
            numeric cell is not a number (``python -m xcardia validate`` lists every such problem).
    """

    p = manifest_file(path)
    raw = read_manifest_text(p)
    if raw.empty:
        raise XcardiaError(f"{p}: the manifest has a header but no patient rows")
    mapping, clashes = apply_aliases(list(raw.columns), detect_aliases(list(raw.columns)))
    if clashes:
        raise XcardiaError(f"{p}: {clashes[0]}")
    raw = raw.rename(columns=mapping)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise XcardiaError(f"{p}: required column(s) {', '.join(missing)} missing; see data_cards/manifest_schema.md")
    if check:  # the same cell checks as `validate` (ranges, flags, categories, splits), so a bad cell is the same
        # clear error in every command — never a wrong target or a traceback far from the cause
        problems = [q for q in cell_problems(raw) if q.severity == "error"]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise XcardiaError(f"{p}: " + "; ".join(str(q) for q in problems[:3]) + more +
                               f" — run `python -m xcardia validate {p}` for the full report")
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
