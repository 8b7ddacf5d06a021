"""One way to write a file so that a crash, a kill or a full disk never leaves it half-written: write a temporary
file beside it, then rename it over the target (atomic on POSIX); on failure the temporary file is removed and the
previous version, if any, stays intact. Every file the project writes goes through :func:`write_atomic`."""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def write_json_atomic(path: str | os.PathLike, payload, indent: int = 2) -> Path:
    """``payload`` as JSON (NumPy scalars, NaN and tuples made JSON-safe by :func:`xcardia.results.to_jsonable`)."""
    from xcardia.results import to_jsonable

    return write_text_atomic(path, json.dumps(to_jsonable(payload), indent=indent) + "\n")
