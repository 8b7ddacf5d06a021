"""Evaluations with files: the fine-tuning sweep and k-shot of a set of inits kept in an output folder (records,
predictions, subsets, fingerprint), reused when the configuration matches; and the inits a profile compares."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from xcardia.atomic import write_text_atomic
from xcardia.finetune.encoding import refuse_unfinished
from xcardia.finetune.experiment import load_predictions, prepare_experiment, run_fraction_sweep, run_kshot, save_predictions
from xcardia.finetune.subsets import fraction_subset, labelled_rows
from xcardia.run_folder import RunFolder, RunLock, cohort_fingerprint, describe_cohort_change
from xcardia.specs import FinetuneSpec


def _fingerprint(profile, manifest, inits: dict, spec: FinetuneSpec, seed: int, part: str,
                 allow_unfinished: bool = False) -> dict:
    sources = {}
    for name, source in inits.items():
        p = Path(str(source))
        encoder = RunFolder(p).encoder if p.is_dir() else p
        sources[name] = {"source": str(source), "mtime": encoder.stat().st_mtime_ns if encoder.exists() else None}
    return {"part": part, "profile": profile.name, "manifest": str(Path(manifest.attrs["path"]).resolve()),
            "cohort": cohort_fingerprint(manifest), "inits": sources, "spec": asdict(spec), "seed": seed,
            "unfinished_inits": sorted(name for name, source in inits.items()
                                       if allow_unfinished and refuse_unfinished(str(source), True, lambda *_: None))}


def _reusable(folder: Path, fingerprint: dict, files) -> bool:
    config = folder / "config.json"
    return (config.exists() and json.loads(config.read_text()) == json.loads(json.dumps(fingerprint))
            and all((folder / f).exists() for f in files))


def _write_json(path: Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def _run_part(part: str, profile, manifest_path, inits: dict, out_dir, cache_dir, spec: FinetuneSpec | None,
              seed: int, progress: bool, log, allow_unfinished: bool = False) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """Run (or reuse) one evaluation part — ``finetune`` or ``fewshot`` — and keep its files in ``out_dir``."""
    from xcardia.data.manifest import load_manifest

    spec = spec or profile.finetune
    out = Path(out_dir)
    prefix = "" if part == "finetune" else "kshot_"
    files = {k: out / f"{prefix}{k}" for k in ("records.csv", "predictions.npz", "subsets.json")}

    manifest = load_manifest(manifest_path)
    for source in inits.values():  # refused before anything is read or written
        refuse_unfinished(str(source), allow_unfinished, log)
    fingerprint = _fingerprint(profile, manifest, inits, spec, seed, part, allow_unfinished)
    with RunLock(out, f"{part} evaluation"):
        if _reusable(out, fingerprint, [*files.values(), out / "test_labels.npy"]):
            log(f"[{part}] reusing the results in {out}")
            return (pd.read_csv(files["records.csv"]), load_predictions(files["predictions.npz"]),
                    np.load(out / "test_labels.npy"))
        previous = out / "config.json"
        if previous.exists():
            changed = describe_cohort_change(json.loads(previous.read_text()).get("cohort"), fingerprint["cohort"])
            if changed:
                log(f"[{part}] the cohort changed since the results in {out} ({changed}): recomputing them")
        return _compute_part(part, profile, manifest, inits, out, files, fingerprint, cache_dir, spec, seed, progress, log,
                             allow_unfinished)


def _compute_part(part, profile, manifest, inits, out, files, fingerprint, cache_dir, spec, seed, progress, log,
                  allow_unfinished=False):
    started = time.perf_counter()
    exp = prepare_experiment(profile, manifest, inits, cache_dir or out.parent / "cache", spec, seed, log,
                             allow_unfinished)
    if part == "finetune":
        records, predictions = run_fraction_sweep(exp, log, progress)
        ids = manifest["patient_id"].to_numpy()
        train = labelled_rows(exp.labels, exp.rows["train"])
        subsets = {str(f): {str(s): [str(i) for i in ids[fraction_subset(train, f, s)]]
                            for s in spec.fraction_seeds} for f in spec.fractions}
    else:
        records, predictions, subsets = run_kshot(exp, log, progress)
    out.mkdir(parents=True, exist_ok=True)
    records.to_csv(files["records.csv"], index=False)
    save_predictions(files["predictions.npz"], predictions)
    np.save(out / "test_labels.npy", exp.test_labels())
    _write_json(files["subsets.json"], subsets)
    _write_json(out / f"{'' if part == 'finetune' else 'kshot_'}timing.json",
                {**exp.timing, "total_s": round(time.perf_counter() - started, 2)})
    _write_json(out / "config.json", fingerprint)
    return records, predictions, exp.test_labels()


def finetune_experiment(profile, manifest_path, inits: dict, out_dir, cache_dir=None, spec: FinetuneSpec | None = None,
                        seed: int = 0, progress: bool = False, log=print,
                        allow_unfinished: bool = False) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """The label-fraction sweep (``paper`` and ``probe`` for every init, ``scratch_all`` for scratch) with its
    files in ``out_dir``: ``records.csv``, ``predictions.npz``, ``subsets.json`` (patient ids of every fraction ×
    seed), ``test_labels.npy`` and ``config.json``. A folder holding the same configuration's results is reused.

    Returns the records, the test predictions and the test labels (n_test, 10)."""
    return _run_part("finetune", profile, manifest_path, inits, out_dir, cache_dir, spec, seed, progress, log,
                     allow_unfinished)


def fewshot_experiment(profile, manifest_path, inits: dict, out_dir, cache_dir=None, spec: FinetuneSpec | None = None,
                        seed: int = 0, progress: bool = False, log=print,
                        allow_unfinished: bool = False) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """True k-shot for every init with its files in ``out_dir``: ``kshot_records.csv``, ``kshot_predictions.npz``,
    ``kshot_subsets.json`` (``{task: {k: {seed: [patient ids]}}}``, or the reason a draw was impossible),
    ``test_labels.npy`` and ``config.json``. Reused when the configuration matches."""
    return _run_part("fewshot", profile, manifest_path, inits, out_dir, cache_dir, spec, seed, progress, log,
                     allow_unfinished)


#: Suffix of an init that uses a run's last-epoch encoder instead of the one the paper's rule selected.
LAST_SUFFIX = "@last"


def profile_inits(profile, runs_dir, last_epoch: bool = True) -> dict[str, str]:
    """Every init the profile compares, by name: ``scratch_sK`` (one per ``init_seeds``), each pretraining run's
    selected encoder (``name``) and, for replicated runs (several seeds) and when ``last_epoch``, its last-epoch
    encoder (``name@last``) — so every comparison is reported for both selections (issue 11.4)."""
    from xcardia.reporting import group_of

    runs = Path(runs_dir)
    inits = {f"scratch_s{k}": f"scratch:{k}" for k in profile.init_seeds}
    groups: dict[str, int] = {}
    for name in profile.pretrain_runs:
        groups[group_of(name)] = groups.get(group_of(name), 0) + 1
    for name in profile.pretrain_runs:
        inits[name] = str(runs / name)
    if last_epoch:
        for name in profile.pretrain_runs:
            if groups[group_of(name)] > 1:
                inits[name + LAST_SUFFIX] = str(RunFolder(runs / name).encoder_last)
    return inits


def representative_inits(inits: dict[str, str]) -> dict[str, str]:
    """One init per method for the single-seed analyses (notebook 03): the first seed of every group, selected
    encoders only, named by their method (``scratch``, ``clip``, ``xcardia_paper``, …)."""
    from xcardia.reporting import group_of

    out: dict[str, str] = {}
    for name, source in inits.items():
        if name.endswith(LAST_SUFFIX):
            continue
        out.setdefault(group_of(name), source)
    return out
