"""One way to write a file so that a crash, a kill or a full disk never leaves it half-written: write a temporary
file beside it, then rename it over the target (atomic on POSIX); on failure the temporary file is removed and the
previous version, if any, stays intact. Every file the project writes goes through :func:`write_atomic`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def write_atomic(path: str | os.PathLike, write, suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    Args:
        path: the target.
        write: ``callable(tmp_path)`` that writes the whole file.
        suffix: extension the writer needs on the temporary name (``.npz`` for NumPy, ``.nii.gz`` for NIfTI).
            The process id is part of the name, so ranks writing the same cache entry never collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def to_jsonable(value):
    """Plain JSON types: numpy scalars/arrays → Python, NaN/inf/pd.NA → None, tuples → lists, Paths → str."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if type(value).__name__ == "NAType":  # pandas' missing value of a nullable column (e.g. Int64)
        return None
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    return value


def write_json_atomic(path: str | os.PathLike, payload, indent: int = 2) -> Path:
    """``payload`` as JSON (NumPy scalars, NaN and tuples made JSON-safe by :func:`to_jsonable`)."""
    return write_text_atomic(path, json.dumps(to_jsonable(payload), indent=indent) + "\n")
