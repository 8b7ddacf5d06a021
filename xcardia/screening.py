"""``xcardia screen``: a screening bundle applied to a folder of chest CTs (issue 20), TotalSegmentator's habits —
a folder (or a label-free manifest) in, files out, one command.

Per patient: series QC first (the checks of ``validate --deep``: readable, a chest with lungs, non-contrast); a CT
that fails is listed with its reason and never scored. Then the bundle's preprocessing (heart mask column or
heuristic crop), ten calibrated risks, a flag at each operating point, the four NW concept estimates with their top
supports, and a one-page report.

    <out>/predictions.csv        one row per patient: QC status and reason, ten risks, flags, concept estimates
    <out>/report/<patient>.png   the encoder's input with an occlusion map, risk bars against both thresholds, concepts
    <out>/patients/<patient>.json  the same row and its key (bundle sha256, CT sha256, preprocessing), written last;
                                 the CT's size and modification time, so an unchanged CT is not read again to hash it
    <out>/screen.json            the bundle (name, sha256), versions, counts, status — the folder's marker, written
                                 before the first patient (``running``) and again at the end (``complete``)

Every risk is traceable to one CT and one intact bundle: the bundle's integrity record is verified first
(:func:`xcardia.bundle.verify_integrity`); a patient's record is reused only when its key matches this bundle,
this CT's bytes and this preprocessing (a scan replaced under the same name is rescored and said); a folder screened
with another bundle is refused; ``predictions.csv`` is rebuilt from the records. Crash-safe: a screen killed at any
point is resumed by the same command; a second screen of the same folder is told which process holds it. Patient
file names never collide (ids that sanitise alike, or too long for a file name, get a hash of the id). A non-finite
risk is never "not flagged": that patient is listed as failed with the reason. Never writes inside an input folder;
every bad input is one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xcardia.atomic import write_text_atomic
from xcardia.errors import XcardiaError
from xcardia.schema import CONCEPT_NAMES, LABELS

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MARKER = "screen.json"


@dataclass(frozen=True)
class ScreeningInput:
    patient_id: str
    ct_path: Path
    heart_mask_path: Path | None = None


def _safe_id(text: str) -> str:
    """The file name of a patient's record and report: the id itself when it is a safe, short name; otherwise its
    safe characters (at most 80) and a short hash of the whole id, so ids that sanitise alike (``P 1``, ``P_1``,
    ``P/1``) never share a file and a 250-character id never makes a name the file system refuses."""
    import hashlib

    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._")
    if out == text and 0 < len(out) <= 80:
        return out
    return f"{(out or 'patient')[:80]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def ct_stat(path: Path) -> list[int]:
    """A cheap signature of a CT on disk — (files, total bytes, latest modification in ns) — that tells whether its
    content sha256 must be computed again."""
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return [len(stats), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def known_fingerprint(path: Path, previous: dict | None) -> str:
    """The CT's content sha256 (:func:`ct_fingerprint`), taken from its earlier record when the file (or DICOM
    folder) has the same size and modification time — so a resumed screen or the last of N shards does not read a
    whole archive again — and computed afresh otherwise (a scan re-exported under the same name is re-read)."""
    if previous and previous.get("ct_stat") == ct_stat(path) and (previous.get("key") or {}).get("ct_sha256"):
        return previous["key"]["ct_sha256"]
    return ct_fingerprint(path)


def ct_fingerprint(path: Path) -> str:
    """sha256 of a CT's content: the file's bytes, or a DICOM folder's file names and bytes in sorted order. A scan
    re-exported under the same name gets another fingerprint, so its old risks are never reused."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _is_dicom_folder(folder: Path) -> bool:
    files = [f for f in folder.iterdir() if f.is_file()]
    return bool(files) and any(f.suffix.lower() in (".dcm", "") for f in files)


def skipped_entries(data: str | os.PathLike) -> list[str]:
    """The entries of a screening folder that are neither a NIfTI file nor a DICOM series folder (listed in
    ``screen.json`` and the log, so the counts add up); empty for a manifest."""
    p = Path(data)
    if not p.is_dir() or (p / "manifest.csv").is_file():
        return []
    return [e.name for e in sorted(p.iterdir())
            if not ((e.is_file() and e.name.lower().endswith(NIFTI_SUFFIXES)) or (e.is_dir() and _is_dicom_folder(e)))]


def screening_inputs(data: str | os.PathLike) -> list[ScreeningInput]:
    """The CTs to screen: a manifest (``patient_id``, ``ct_path``, optional ``heart_mask_path``; labels are not
    needed and not read), a folder holding ``manifest.csv``, or a folder of NIfTI files and DICOM series folders
    (one patient each, named by the file or folder)."""
    from xcardia.data.manifest import manifest_file, read_manifest_text, resolve_ct_path

    p = Path(data)
    if not p.exists():
        raise XcardiaError(f"--data {p} does not exist; pass a manifest.csv or a folder of chest CTs")
    if p.is_file() or (p / "manifest.csv").is_file():
        path = manifest_file(p)
        frame = read_manifest_text(path)
        missing = [c for c in ("patient_id", "ct_path") if c not in frame.columns]
        if missing:
            raise XcardiaError(f"{path}: column(s) {', '.join(missing)} missing; a screening manifest needs "
                               f"patient_id and ct_path (heart_mask_path optional)")
        frame.attrs["path"], frame.attrs["root"] = str(path), str(Path(path).resolve().parent)  # relative ct_path
        out = []
        for i, row in frame.iterrows():
            if not str(row["ct_path"]).strip():
                raise XcardiaError(f"{path} row {i + 2} (patient {row['patient_id']}): ct_path is empty")
            mask = row.get("heart_mask_path")
            mask = resolve_ct_path(frame, str(mask)) if isinstance(mask, str) and mask.strip() else None
            out.append(ScreeningInput(str(row["patient_id"]), resolve_ct_path(frame, str(row["ct_path"])), mask))
        ids = [x.patient_id for x in out]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise XcardiaError(f"{path}: patient_id {', '.join(dup[:3])} appears more than once")
        return out
    out = []
    for entry in sorted(p.iterdir()):
        name = entry.name
        if entry.is_file() and name.lower().endswith(NIFTI_SUFFIXES):
            stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
            out.append(ScreeningInput(stem, entry))
        elif entry.is_dir() and _is_dicom_folder(entry):
            out.append(ScreeningInput(name, entry))
    if not out:
        raise XcardiaError(f"--data {p}: no manifest.csv, NIfTI file (*.nii, *.nii.gz) or DICOM series folder in it; "
                           f"put one CT per patient there")
    return out


def _refuse_output_folder(out: Path, inputs: list[ScreeningInput], data: Path, model_dir: Path) -> None:
    out_r = out.resolve()
    # the folders holding images (and the bundle); a manifest's own folder is not one of them
    folders = {model_dir.resolve()} | ({data.resolve()} if data.is_dir() and not (data / "manifest.csv").is_file() else set())
    for x in inputs:
        folders.add(x.ct_path.resolve() if x.ct_path.is_dir() else x.ct_path.resolve().parent)
        if x.heart_mask_path is not None:  # a heart-mask folder is an input folder too
            folders.add(x.heart_mask_path.resolve().parent)
    for folder in folders:
        if out_r == folder or folder in out_r.parents:
            raise XcardiaError(f"--out {out} is inside an input folder ({folder}); screening never writes among its "
                               f"inputs — give a folder elsewhere (nothing was written)")
    if out.exists() and not out.is_dir():
        raise XcardiaError(f"--out {out} is a file; give a folder (nothing was written)")
    from xcardia.run_folder import LOCK_NAME

    if out.is_dir() and any(p.name not in (LOCK_NAME, "shards") for p in out.iterdir()) and not (out / MARKER).exists():
        raise XcardiaError(f"--out {out} is a non-empty folder that is not a screening output; give a new or empty "
                           f"folder (nothing was written)")


def series_check(path: Path, spec, fail_on=("error", "contrast")) -> str | None:
    """None when the CT passes screening QC, else the reason: the first finding in ``fail_on``, or a series-QC
    error that preprocessing would refuse (the reason the screening table then lists)."""
    return _checked(path, spec, fail_on)[0]


def _checked(path: Path, spec, fail_on=("error", "contrast")):
    """``(reason, None)`` when the CT fails screening QC, else ``(None, the CT as read in RAS)`` — the image that
    preprocessing then uses, so a screened CT is read once."""
    from xcardia.data.imaging import load_ras
    from xcardia.data.qc import dicom_series_qc, series_qc

    try:
        img = load_ras(path, spec)
    except XcardiaError as exc:
        return str(exc), None
    findings = series_qc(img.as_tensor().numpy()[0], tuple(float(abs(z)) for z in img.pixdim))
    if path.is_dir():
        import pydicom

        try:
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(path.iterdir()) if f.is_file()]
            findings += dicom_series_qc(headers)
        except Exception as exc:  # noqa: BLE001
            return f"unreadable DICOM header ({type(exc).__name__}: {exc})", None
    for severity, check, message in findings:
        if severity in fail_on or check in fail_on:
            return f"{check}: {message}", None
    errors = [message for severity, _check, message in findings if severity == "error"] if spec.series_qc else []
    if errors:  # what preprocess_ct would refuse
        return f"{path}: {errors[0]}", None
    return None, img


def threshold_of(points: dict, task: str, point: str) -> float:
    """A task's threshold at an operating point; NaN where validation could not set one (stored as null)."""
    value = points[task][point]["threshold"]
    return float("nan") if value is None else float(value)


@torch.no_grad()
def score(bundle: dict, volume: np.ndarray) -> dict:
    """Raw and calibrated risks, flags and NW concept estimates for one preprocessed volume (X, Y, Z)."""
    from xcardia.bundle import apply_calibration
    from xcardia.losses import nw_predict

    network, inference = bundle["network"], bundle["inference"]
    x = torch.as_tensor(volume, dtype=torch.float32)[None, None]
    raw = torch.sigmoid(network(x))[0].numpy().astype(float)
    out = {}
    for t, task in enumerate(LABELS):
        risk = float(apply_calibration(raw[t:t + 1], inference["calibration"][task])[0])
        out[f"risk_{task}"] = risk
        for point in ("sensitivity_90", "specificity_90"):
            threshold = threshold_of(inference["operating_points"], task, point)
            out[f"flag_{point}_{task}"] = bool(risk >= threshold)  # False where no threshold (NaN)
        out[f"raw_{task}"] = float(raw[t])
    bank = bundle["bank"]
    if bank is not None:
        query = torch.nn.functional.normalize(bank["projection"](network.features(x)), dim=1)
        prediction, weights = nw_predict(query, bank["supports"], bank["concepts"], bank["temperature"])
        top = torch.argsort(weights[0], descending=True)[:3]
        for c, name in enumerate(CONCEPT_NAMES):
            out[f"concept_{name}"] = float(prediction[0, c])
        out["top_supports"] = ";".join(f"{bank['support_ids'][int(i)]}:{float(weights[0, i]):.3f}" for i in top)
    return out


def occlusion_map(network, volume: np.ndarray, task_index: int, mask_size: int = 8) -> np.ndarray:
    """MONAI's occlusion sensitivity of one task's logit: how much the logit drops when the region around each voxel
    is replaced by the image mean (positive: the region supports the risk)."""
    from monai.visualize import OcclusionSensitivity

    class _One(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[:, task_index:task_index + 1]

    model = _One(network).eval()
    x = torch.as_tensor(volume, dtype=torch.float32)[None, None]
    occ = OcclusionSensitivity(model, mask_size=mask_size, n_batch=16, mode="mean_img", verbose=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI 1.6 indexes with a list (a PyTorch deprecation)
        occluded, _ = occ(x)  # the task's logit with each region hidden
        original = model(x)[0, 0]
    return (original - occluded[0, 0]).numpy()


def shard_of(patient_id: str, n: int) -> int:
    """The shard (1…n) a patient belongs to: a hash of its id, so the split depends neither on the order of the
    inputs nor on which other patients are in them (array jobs that list the same folder agree)."""
    import hashlib

    return int(hashlib.sha256(patient_id.encode()).hexdigest(), 16) % n + 1


def screen(model_dir: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike, workers: int = 0,
           force: bool = False, reports: bool = True, batch_size: int = 8, progress: bool = True, log=print,
           shard: tuple[int, int] | None = None, merge_only: bool = False) -> Path:
    """Screen every CT of ``data`` with the bundle in ``model_dir``; write ``out_dir`` (see the module docstring).

    Args:
        shard: ``(k, n)``: screen only the patients of shard k of n (:func:`shard_of`) — n scheduler array jobs fill
            one ``out_dir`` safely, each under its own lock; whichever finds every patient's record in place (the
            last to finish) rebuilds ``predictions.csv`` and ``screen.json``.
        merge_only: screen nothing; rebuild ``predictions.csv`` and ``screen.json`` from the records (refused while
            a patient has no record matching this bundle and scan).

    Returns:
        ``out_dir``.
    """
    from xcardia.progress import bar as tqdm

    from xcardia import __version__
    from xcardia.atomic import to_jsonable
    from xcardia.bundle import load_bundle
    from xcardia.run_folder import RunLock

    bundle = load_bundle(model_dir)
    inputs = screening_inputs(data)
    out = Path(out_dir)
    spec = bundle["preprocess"]
    fail_on = tuple(bundle["inference"].get("qc", {}).get("fail_on", ("error", "contrast")))
    meta = bundle["metadata"]
    record = {
        "bundle": {"name": meta["name"], "root": str(bundle["root"]), "format_version": meta["format_version"],
                   "synthetic": meta["trained_on"]["synthetic"], "sha256": bundle["digest"]},
        "xcardia_version": __version__, "torch_version": torch.__version__, "data": str(Path(data).resolve())}
    key = {"bundle_sha256": bundle["digest"], "preprocessing": to_jsonable(asdict(spec))}
    _refuse_output_folder(out, inputs, Path(data), Path(model_dir))  # before anything is written
    mine = [x for x in inputs if shard is None or shard_of(x.patient_id, shard[1]) == shard[0]]
    lock = RunLock(out if shard is None else out / "shards" / f"{shard[0]}-of-{shard[1]}",
                   "screening" if shard is None else f"screening shard {shard[0]}/{shard[1]}")
    with lock:  # a second screen of this folder (or shard) is told which process holds it
        _refuse_other_bundle(out, bundle)
        def record_of(x):
            return _read_record(out / "patients" / f"{_safe_id(x.patient_id)}.json")

        fingerprints = {x.patient_id: known_fingerprint(x.ct_path, record_of(x)) for x in mine}
        todo, changed = [], []
        if not merge_only:
            if not (out / MARKER).exists() or shard is None:
                # the marker before the first patient: an interrupted screen leaves a folder the same command resumes
                write_text_atomic(out / MARKER, json.dumps(to_jsonable({**record, "status": "running"}), indent=1) + "\n")
            (out / "patients").mkdir(exist_ok=True)
            if reports:
                (out / "report").mkdir(exist_ok=True)
            for x in mine:
                previous = record_of(x)
                if force or previous is None:
                    todo.append(x)
                elif previous.get("key") != {**key, "ct_sha256": fingerprints[x.patient_id]}:
                    todo.append(x)
                    changed.append(x.patient_id)
            log(f"[screen] {len(mine)} CT(s){f' in shard {shard[0]}/{shard[1]}' if shard else ''}, "
                f"{len(mine) - len(todo)} already screened with this bundle and these scans (reused; --force redoes "
                f"them)" + (f"; {len(changed)} changed since (rescored): {', '.join(changed[:5])}" if changed else ""))
            loader = torch.utils.data.DataLoader(_Prepared(todo, spec, fail_on), batch_size=batch_size,
                                                 num_workers=workers, collate_fn=list)
            for batch in tqdm(loader, desc="screening", disable=not progress, total=len(loader)):
                for item in batch:
                    row = {"patient_id": item["input"].patient_id, "ct_path": str(item["input"].ct_path)}
                    if item["reason"] is not None:
                        row.update(qc="failed", qc_reason=item["reason"])
                    else:
                        row.update(qc="passed", qc_reason="", **score(bundle, item["volume"]))
                        if not all(np.isfinite(row[f"risk_{t}"]) for t in LABELS):  # never "not flagged" by a NaN
                            row = {"patient_id": row["patient_id"], "ct_path": row["ct_path"], "qc": "failed",
                                   "qc_reason": "the bundle gave a non-finite risk for this CT (check the bundle)"}
                        elif reports:
                            _report(bundle, item, row, out / "report" / f"{_safe_id(row['patient_id'])}.png")
                    write_text_atomic(out / "patients" / f"{_safe_id(row['patient_id'])}.json",
                                      json.dumps(to_jsonable({**row, "key": {**key, "ct_sha256": fingerprints[row["patient_id"]]},
                                                              "ct_stat": ct_stat(item["input"].ct_path)}),
                                                 indent=1) + "\n")
    with RunLock(out / "shards" / "merge", "screening merge"):
        records = {x.patient_id: record_of(x) for x in inputs}
        for x in inputs:  # the other shards' patients: their sha256 is re-read only where the file changed since
            if x.patient_id not in fingerprints:
                fingerprints[x.patient_id] = known_fingerprint(x.ct_path, records[x.patient_id])
        missing = [pid for pid, r in records.items()
                   if r is None or r.get("key") != {**key, "ct_sha256": fingerprints[pid]}]
        if missing:
            if merge_only:
                raise XcardiaError(f"--out {out}: {len(missing)} patient(s) not screened yet with this bundle and "
                                   f"these scans (e.g. {missing[0]}); run the missing shards first")
            log(f"[screen] shard {shard[0]}/{shard[1]} done; {len(missing)} patient(s) wait for other shards — the "
                f"last shard to finish (or `screen --merge`) writes predictions.csv")
            return out
        # the table is rebuilt from the records, never appended to
        frame = pd.DataFrame([{k: v for k, v in records[x.patient_id].items() if k not in ("key", "ct_stat")}
                              for x in inputs])
        write_text_atomic(out / "predictions.csv", frame.to_csv(index=False))
        skipped = skipped_entries(data)
        counts = {"inputs": len(inputs), "scored": int((frame["qc"] == "passed").sum()),
                  "failed_qc": int((frame["qc"] == "failed").sum()), "resumed": len(mine) - len(todo),
                  "rescored_changed": len(changed), "skipped_not_an_image": len(skipped)}
        record["counts"] = counts
        record["skipped_not_an_image"] = skipped
        if skipped:
            log(f"[screen] {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} of the folder skipped, not a NIfTI "
                f"file or DICOM series folder: {', '.join(skipped[:5])}")
        performance = labelled_performance(Path(data), frame, bundle)
        if performance is not None:
            record["performance_by_subgroup"] = performance
            log(f"[screen] the manifest has labels: performance by subgroup written to {out / MARKER}")
        write_text_atomic(out / MARKER, json.dumps(to_jsonable({**record, "status": "complete"}), indent=1) + "\n")
    log(f"[screen] {counts['scored']} scored, {counts['failed_qc']} failed QC (listed with the reason): "
        f"{out / 'predictions.csv'}")
    return out


def labelled_performance(data: Path, predictions: pd.DataFrame, bundle: dict, n_boot: int = 200) -> list[dict] | None:
    """When ``data`` is a manifest that also holds task labels (an evaluation, not a blind screen): the scored
    patients' subgroup table (:func:`xcardia.subgroups.subgroup_table`: AUROC, calibration, operating points by sex
    and age band, with counts and intervals). None for a folder or a label-free manifest."""
    from xcardia.subgroups import subgroup_table

    if data.is_dir() or data.suffix.lower() != ".csv":
        return None
    table = pd.read_csv(data, dtype={"patient_id": str})
    tasks = [t for t in LABELS if t in table]
    if not tasks or "patient_id" not in table:
        return None
    scored = predictions[predictions["qc"] == "passed"].astype({"patient_id": str})
    rows = table.drop_duplicates("patient_id").set_index("patient_id").reindex(scored["patient_id"]).reset_index()
    labels = rows[tasks].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    risks = scored[[f"risk_{t}" for t in tasks]].to_numpy(dtype=float)
    points = {t: {k: {"threshold": v["threshold"]} for k, v in bundle["inference"]["operating_points"][t].items()}
              for t in tasks}
    return subgroup_table(rows, labels, risks, points, n_boot=n_boot, tasks=tasks).to_dict(orient="records")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or torn by a crash: screened again


def _refuse_other_bundle(out: Path, bundle: dict) -> None:
    """One screening folder, one bundle: a folder screened with another bundle is refused (its risks must never be
    mixed with, or mistaken for, this bundle's)."""
    previous = _read_record(out / MARKER)
    if previous is None:
        return
    theirs = (previous.get("bundle") or {}).get("sha256")
    if theirs != bundle["digest"]:
        which = f"sha256 {theirs[:12]}…" if theirs else "no bundle digest: an earlier xcardia wrote it"
        raise XcardiaError(f"--out {out} holds a screening by bundle {previous.get('bundle', {}).get('name')!r} "
                           f"({which}); this is bundle {bundle['metadata']['name']!r} (sha256 "
                           f"{bundle['digest'][:12]}…) — give another --out, or delete that folder to rescreen")


class _Prepared(torch.utils.data.Dataset):
    """QC and preprocessing of one input (in a loader worker when ``--workers`` > 0)."""

    def __init__(self, inputs: list[ScreeningInput], spec, fail_on):
        self.inputs, self.spec, self.fail_on = inputs, spec, fail_on

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict:
        from xcardia.data.imaging import preprocess_ct

        x = self.inputs[i]
        reason, loaded = _checked(x.ct_path, self.spec, self.fail_on)
        volume = None
        if reason is None:
            try:
                volume = preprocess_ct(x.ct_path, self.spec, x.heart_mask_path, loaded=loaded)
            except XcardiaError as exc:
                reason = str(exc)
        return {"input": x, "reason": reason, "volume": volume}


def _report(bundle: dict, item: dict, row: dict, path: Path) -> None:
    from xcardia.atomic import write_atomic
    from xcardia.figures.screening import plot_patient_report

    best = int(np.argmax([row[f"risk_{t}"] for t in LABELS]))
    saliency = occlusion_map(bundle["network"], item["volume"], best)
    fig = plot_patient_report(item["volume"], saliency, row, bundle["inference"]["operating_points"],
                              LABELS[best], bundle["metadata"]["trained_on"]["synthetic"])
    import matplotlib.pyplot as plt

    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), suffix=".png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ notebook 06
def label_free_manifest(manifest: pd.DataFrame, split: str, path: str | os.PathLike) -> Path:
    """The patients of ``split`` as a screening manifest (patient_id, ct_path as absolute paths, heart_mask_path
    when the cohort has one) and nothing else: no labels travel with CTs screened "as if new"."""
    from xcardia.data.manifest import resolve_ct_path

    rows = manifest[manifest["split"].astype(str) == split]
    frame = pd.DataFrame({"patient_id": rows["patient_id"].astype(str),
                          "ct_path": [str(resolve_ct_path(manifest, str(v)).resolve()) for v in rows["ct_path"]]})
    if "heart_mask_path" in rows and rows["heart_mask_path"].notna().any():
        frame["heart_mask_path"] = [str(resolve_ct_path(manifest, str(v)).resolve()) if isinstance(v, str) and v
                                    else "" for v in rows["heart_mask_path"]]
    write_text_atomic(path, frame.to_csv(index=False))
    return Path(path)


def select_init_on_val(profile, manifest_path, inits: dict[str, str], cache_dir, seed: int = 123, log=print):
    """Which init to export: each candidate trained with the ``paper`` protocol on every training label, scored by
    validation macro AUROC (the test split is not looked at). Returns ``(best name, table)``."""
    from xcardia.data.manifest import load_manifest
    from xcardia.finetune import macro_auroc, predict_top, labelled_rows, prepare_experiment, train_top

    manifest = load_manifest(manifest_path)
    exp = prepare_experiment(profile, manifest, inits, cache_dir, profile.finetune, 0, log=lambda *_: None)
    train, val = labelled_rows(exp.labels, exp.rows["train"]), exp.rows["val"]
    rows = []
    for name, init in exp.inits.items():
        model = train_top(init, exp.labels, train, val, profile.finetune, seed)
        score = macro_auroc(exp.labels[val], predict_top(model, init.trunk[torch.as_tensor(init.at(val))]))
        rows.append({"init": name, "val_macro_auroc": score})
        log(f"[screen] {name}: validation macro AUROC {score:.3f}")
    table = pd.DataFrame(rows).sort_values("val_macro_auroc", ascending=False).reset_index(drop=True)
    return str(table["init"].iloc[0]), table


def evaluate_screening(predictions: pd.DataFrame, manifest: pd.DataFrame, bundle: dict,
                       prevalences=(0.01, 0.05, 0.10), min_positives: int = 20) -> dict:
    """What a screening run on labelled patients shows: per task, sensitivity/specificity/PPV/NPV (Wilson 95 %
    intervals) at both operating points chosen on ``val``, PPV at other prevalences, ECE before and after
    calibration, reliability curves and decision curves (tasks with at least ``min_positives`` test positives)."""
    from xcardia.interpret import reliability_curve
    from xcardia.metrics import diagnostic_at_threshold, expected_calibration_error, net_benefit, ppv_at_prevalence

    scored = predictions[predictions["qc"] == "passed"].merge(
        manifest[["patient_id", *LABELS]].astype({"patient_id": str}), on="patient_id", how="left")
    points = bundle["inference"]["operating_points"]
    rows, ppv_rows, calibration, reliability, decision = [], [], [], {}, {}
    for task in LABELS:
        y = scored[task].to_numpy(dtype=float)
        risk, raw = scored[f"risk_{task}"].to_numpy(float), scored[f"raw_{task}"].to_numpy(float)
        n_pos = int(np.nansum(y == 1))
        calibration.append({"task": task, "method": bundle["inference"]["calibration"][task]["method"],
                            "ece_raw": expected_calibration_error(y, raw), "ece_calibrated": expected_calibration_error(y, risk),
                            "n_pos": n_pos})
        for point in ("sensitivity_90", "specificity_90"):
            d = diagnostic_at_threshold(y, risk, threshold_of(points, task, point))
            rows.append({"task": task, "operating_point": point, **d,
                         "val_sensitivity": points[task][point]["sensitivity"],
                         "val_specificity": points[task][point]["specificity"]})
            for prevalence in prevalences:
                ppv_rows.append({"task": task, "operating_point": point, "prevalence": prevalence,
                                 "ppv": ppv_at_prevalence(d["sensitivity"], d["specificity"], prevalence)})
        if n_pos >= min_positives:
            reliability[task] = {"raw": reliability_curve(y, raw), "calibrated": reliability_curve(y, risk)}
            nb = net_benefit(y, risk, np.linspace(0.02, 0.6, 30))
            decision[task] = pd.DataFrame(nb)
    return {"operating_points": pd.DataFrame(rows), "ppv_at_prevalence": pd.DataFrame(ppv_rows),
            "calibration": pd.DataFrame(calibration), "reliability": reliability, "decision": decision,
            "n_scored": int(len(scored)), "n_failed_qc": int((predictions["qc"] == "failed").sum())}
