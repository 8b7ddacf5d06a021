"""What a run folder holds, who may write it, and which cohort it was computed on.

- :class:`RunLock`: one process owns an output folder. An exclusive ``fcntl`` lock on ``<folder>/.lock`` is taken
  before anything else is written; a second process gets a clear error naming the owner's pid at once. The kernel
  drops the lock when its process dies, so a crash never leaves a stale lock behind (the file stays; it is only a
  lock when someone holds it).
- :func:`cohort_fingerprint`: a content hash of the manifest and its row count, recorded in every pretraining
  run, fine-tuning and few-shot output, so reuse and ``--resume`` refuse a cohort that changed underneath them.
- :func:`describe_cohort_change`: what changed between two fingerprints, in words (rows added/removed, splits
  moved, labels changed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from xcardia.errors import XcardiaError

try:  # POSIX only; on other systems the lock is a no-op (stated in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """Exclusive ownership of ``folder`` for the life of this object (use as a context manager).

    Raises:
        XcardiaError: another live process holds the folder.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self._file = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        handle = open(path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise XcardiaError(f"{self.folder} is in use by another {self.what} (process {owner}); wait for it "
                                   f"to finish or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def cohort_fingerprint(manifest) -> dict:
    """``{"manifest_sha256", "rows", "splits", "labels_sha256"}`` of a loaded manifest (a DataFrame with
    ``attrs["path"]``): the file's bytes, and the parts a change of which :func:`describe_cohort_change` names."""
    import pandas as pd

    from xcardia.schema import LABELS

    path = Path(manifest.attrs["path"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ids = manifest["patient_id"].astype(str)
    split = manifest["split"].astype(str)
    labels = [c for c in LABELS if c in manifest.columns]
    label_blob = manifest[["patient_id", *labels]].astype(str).to_csv(index=False) if labels else ""
    return {"manifest_sha256": digest, "rows": int(len(manifest)),
            "splits": hashlib.sha256(pd.Series(split.values, index=ids.values).sort_index().to_csv().encode()).hexdigest(),
            "ids": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
            "labels_sha256": hashlib.sha256(label_blob.encode()).hexdigest()}


def describe_cohort_change(before: dict | None, after: dict) -> str | None:
    """None when the cohort is the same; otherwise what changed, in words."""
    if not before or before.get("manifest_sha256") == after.get("manifest_sha256"):
        return None
    parts = []
    if before.get("rows") != after.get("rows"):
        parts.append(f"rows {before.get('rows')} → {after.get('rows')}")
    elif before.get("ids") != after.get("ids"):
        parts.append("patient ids changed")
    if before.get("splits") != after.get("splits"):
        parts.append("patients moved between splits")
    if before.get("labels_sha256") != after.get("labels_sha256"):
        parts.append("labels changed")
    return ", ".join(parts) or "other cells of the manifest changed"


def refuse_input_paths(target: str | os.PathLike, manifest, what: str) -> None:
    """Refuse to write ``target`` (an output file or folder) where it would overwrite or pollute the inputs: the
    manifest itself, a CT or label map it references, or anything inside a folder that holds its images.

    Raises:
        XcardiaError: naming the input that would be hit.
    """
    from xcardia.data.manifest import resolve_ct_path

    t = Path(target).resolve()
    manifest_path = Path(manifest.attrs["path"]).resolve()
    root = manifest_path.parent
    if t == manifest_path:
        raise XcardiaError(f"{what} {target} is the manifest itself; write it elsewhere (nothing was written)")
    image_dirs, images = set(), set()
    for column in ("ct_path", "labelmap_path"):
        if column not in manifest:
            continue
        for value in manifest[column].dropna():
            p = resolve_ct_path(manifest, str(value)).resolve()
            images.add(p)
            folder = p if p.is_dir() else p.parent
            if folder != root:
                image_dirs.add(folder)
    if t in images:
        raise XcardiaError(f"{what} {target} is one of the cohort's images; write it elsewhere (nothing was written)")
    for folder in image_dirs:
        if t == folder or folder in t.parents:
            raise XcardiaError(f"{what} {target} is inside the cohort's image folder {folder}; write it elsewhere "
                               f"(nothing was written)")
