"""What a run folder holds, who may write it, and which cohort it was computed on.

- :class:`RunFolder`: a pretraining run's folder as one object that knows its files — the engine writes through it,
  embeddings and interpretability read through it; no other module spells a file name of a run.
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

import csv
import hashlib
import json
import os
from pathlib import Path

import torch

from xcardia.atomic import write_atomic, write_json_atomic
from xcardia.data.identity import image_identity  # noqa: F401 - re-exported
from xcardia.errors import XcardiaError
from xcardia.support_bank import SupportBank

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
                owner, _, kind = handle.read().strip().partition(" ")
                handle.close()
                raise XcardiaError(f"{self.folder} is in use by a {kind or 'process'} (process {owner or 'unknown'}); "
                                   f"wait for it to finish or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {self.what}")  # the holder names its own kind in any later refusal
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
    """``{"manifest_sha256", "rows", "splits", "labels_sha256", "images", "image_ids"}`` of a loaded manifest (a
    DataFrame with ``attrs["path"]``): the file's bytes, the identity of every CT and heart mask it points to
    (:func:`image_identity`), and the parts a change of which :func:`describe_cohort_change` names."""
    import pandas as pd

    from xcardia.schema import LABELS

    path = Path(manifest.attrs["path"])
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    # the text with line endings and a BOM normalised: a CRLF-only re-save is not a change of the cohort
    text_digest = hashlib.sha256(data.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")).hexdigest()
    ids = manifest["patient_id"].astype(str)
    split = manifest["split"].astype(str)
    labels = [c for c in LABELS if c in manifest.columns]
    label_blob = manifest[["patient_id", *labels]].astype(str).to_csv(index=False) if labels else ""
    from xcardia.data.manifest import resolve_ct_path

    image_ids = {}
    for column in ("ct_path", "heart_mask_path"):
        if column in manifest:
            for pid, value in zip(ids, manifest[column]):
                if isinstance(value, str) and value.strip():
                    image_ids[f"{pid}:{column}"] = image_identity(resolve_ct_path(manifest, value))
    return {"manifest_sha256": digest, "manifest_text_sha256": text_digest, "rows": int(len(manifest)),
            "splits": hashlib.sha256(pd.Series(split.values, index=ids.values).sort_index().to_csv().encode()).hexdigest(),
            "ids": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
            "labels_sha256": hashlib.sha256(label_blob.encode()).hexdigest(),
            "images": hashlib.sha256(json.dumps(image_ids, sort_keys=True).encode()).hexdigest(),
            "image_ids": image_ids}


def describe_cohort_change(before: dict | None, after: dict) -> str | None:
    """None when the cohort is the same; otherwise what changed, in words (naming up to three changed images)."""
    if not before:
        return None
    same_text = before.get("manifest_text_sha256") is not None and \
        before.get("manifest_text_sha256") == after.get("manifest_text_sha256")
    if before.get("manifest_sha256") == after.get("manifest_sha256") or same_text:
        if "images" not in before or before.get("images") == after.get("images"):
            return None  # (a fingerprint written before images were recorded compares the manifest only)
        old, new = before.get("image_ids", {}), after.get("image_ids", {})
        changed = sorted(k for k in new if old.get(k) != new[k])
        names = ", ".join(k.replace(":ct_path", " CT").replace(":heart_mask_path", " heart mask") for k in changed[:3])
        return f"{len(changed)} image(s) replaced since: {names}{' …' if len(changed) > 3 else ''}"
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
    if t == root:
        raise XcardiaError(f"{what} {target} is the cohort's own folder; write it elsewhere (nothing was written)")
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


def refuse_foreign_folder(target: str | os.PathLike, markers: tuple[str, ...], what: str, kind: str) -> None:
    """The one rule for output folders (issue 22): a command writes only into a new or empty folder, or one that
    holds its own kind of output (recognised by one of ``markers``) — never over someone else's files.

    Raises:
        XcardiaError: ``target`` is a file, or a non-empty folder without any of ``markers``.
    """
    t = Path(target)
    if t.exists() and not t.is_dir():
        raise XcardiaError(f"{what} {target} is a file; give a folder for the {kind} (nothing was written)")
    if t.is_dir():
        entries = [e for e in t.iterdir() if e.name != LOCK_NAME]
        if entries and not any((t / m).exists() for m in markers):
            raise XcardiaError(f"{what} {target} is a non-empty folder that holds no {kind} (none of "
                               f"{', '.join(markers)}); give a new or empty folder (nothing was written)")


class RunFolder:
    """A pretraining run's folder and the files in it.

    ===================  =====================================================================================
    ``checkpoint.pt``    everything needed to resume exactly (the last complete epoch); written atomically
    ``selected.pt``      the epoch the paper's rule selected, whole: model, tabular preprocessing, NW support
                         bank, configuration and metrics — every later analysis reads this one epoch
    ``encoder.pt``       that epoch's image encoder (what fine-tuning loads); ``encoder_last.pt``: the last one
    ``log.csv/.json``    one row per epoch
    ``run.json``         configuration, cohort fingerprint, status (``running``/``complete``), selection
    ``embeddings/``      cached patient embeddings (:func:`xcardia.embeddings.embed_run`)
    ``.lock``            held by the one process writing the run (:class:`RunLock`)
    ===================  =====================================================================================
    """

    CHECKPOINT = "checkpoint.pt"
    SELECTED = "selected.pt"
    ENCODER = "encoder.pt"
    ENCODER_LAST = "encoder_last.pt"
    RUN_JSON = "run.json"
    #: What makes a folder a run folder (the one output-folder rule: ``refuse_foreign_folder``).
    MARKERS = (RUN_JSON, CHECKPOINT)
    LOG_JSON = "log.json"
    LOG_CSV = "log.csv"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ files
    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def selected(self) -> Path:
        return self.path / self.SELECTED

    @property
    def encoder(self) -> Path:
        return self.path / self.ENCODER

    @property
    def encoder_last(self) -> Path:
        return self.path / self.ENCODER_LAST

    @property
    def run_json(self) -> Path:
        return self.path / self.RUN_JSON

    @property
    def embeddings(self) -> Path:
        return self.path / "embeddings"

    def default_cache(self) -> Path:
        """Where analyses of this run look for preprocessed CTs when no cache is given: ``<runs>/../cache``, the
        layout ``reproduce`` writes (``OUT/runs/NAME`` beside ``OUT/cache``)."""
        return self.path.parent.parent / "cache"

    def holds_a_run(self) -> bool:
        """Whether a pretraining run (finished or not) was ever written here."""
        return self.checkpoint.exists() or self.run_json.exists()

    def lock(self, what: str = "pretraining run") -> RunLock:
        return RunLock(self.path, what)

    # ------------------------------------------------------------------ reading
    def info(self) -> dict | None:
        """``run.json`` (None before the first epoch finished)."""
        return json.loads(self.run_json.read_text()) if self.run_json.exists() else None

    def log(self):
        """The per-epoch log as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(json.loads((self.path / self.LOG_JSON).read_text()))

    def state_file(self, which: str = "selected") -> Path:
        """The file holding the whole model at one epoch: ``selected`` (``selected.pt``) or ``last``
        (``checkpoint.pt``)."""
        if which not in ("selected", "last"):
            raise XcardiaError(f"which must be 'selected' or 'last', got {which!r}")
        path = self.selected if which == "selected" else self.checkpoint
        if not path.exists():
            raise XcardiaError(f"{self.path} holds no {path.name}; pretrain it (again) with this version of xcardia")
        return path

    def load_state(self, which: str = "selected") -> dict:
        """The saved state of one epoch: ``model``, ``tabular``, ``bank``, ``config``, ``epoch`` (and, for
        ``last``, the optimiser, queue and random states)."""
        return torch.load(self.state_file(which), map_location="cpu", weights_only=True)

    def resume_state(self) -> dict:
        """The checkpoint ``--resume`` continues from.

        Raises:
            XcardiaError: it is missing, unreadable (truncated, foreign) or not an xcardia checkpoint.
        """
        if not self.checkpoint.exists():
            raise XcardiaError(f"--resume: {self.checkpoint} does not exist; start without --resume")
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say so, never a traceback
            raise XcardiaError(f"--resume: {self.checkpoint} is not a readable checkpoint ({type(exc).__name__}); "
                               f"delete the run folder and start again") from None
        if not isinstance(state, dict) or "config" not in state:
            raise XcardiaError(f"--resume: {self.checkpoint} is not an xcardia checkpoint; use another --out")
        return state

    def bank(self, which: str = "selected"):
        """The support bank the NW head used at that epoch's validation, unfilled queue slots dropped (a row −1
        would otherwise index the last patient)."""
        state = self.load_state(which)
        bank = state.get("bank")
        if which == "last" and bank is None:
            bank = state.get("queue")
        if bank is None:
            return None
        keep = bank["indices"] >= 0
        return SupportBank(bank["embeddings"][keep], bank["targets"][keep], bank["indices"][keep])

    # ------------------------------------------------------------------ writing (rank 0 only)
    def write_checkpoint(self, state: dict) -> None:
        write_atomic(self.checkpoint, lambda p: torch.save(state, p))

    def write_selected(self, state: dict) -> None:
        write_atomic(self.selected, lambda p: torch.save(state, p))

    def write_logs(self, history: list[dict]) -> None:
        keys = list(dict.fromkeys(k for row in history for k in row))

        def write_csv(path):
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(history)

        write_atomic(self.path / self.LOG_CSV, write_csv)
        write_atomic(self.path / self.LOG_JSON, lambda p: p.write_text(json.dumps(history, indent=1) + "\n"))

    def write_run_json(self, payload: dict) -> None:
        write_json_atomic(self.run_json, payload)
