"""A screening model as a folder any group can share (issue 20): MONAI's bundle layout, ``safetensors`` weights.

    <bundle>/configs/metadata.json     format, versions, tasks, inputs/outputs, training data, intended use
    <bundle>/configs/inference.json    preprocessing, calibration, operating points, NW bank settings; the network
                                       as a MONAI bundle ``_target_`` (``monai.bundle.ConfigParser`` reads it offline)
    <bundle>/models/model.safetensors  image encoder + the paper protocol's top (last stage, feature layer, ten heads)
    <bundle>/models/support_bank.safetensors  image projection + the NW exemplars' image embeddings and concepts
    <bundle>/docs/README.md            the model card (in bold when trained on the synthetic cohort: not for
                                       clinical use)

No pickle travels: weights are ``safetensors``, everything else JSON; :func:`load_bundle` refuses a bundle with a
pickle-capable file in it, or with another format version, in one line.

:func:`export_bundle` trains the init with the ``paper`` protocol on all training labels (early stopping on
``val``), fits per-task probability calibration on ``val`` (isotonic or Platt, chosen by 5-fold cross-validated
log-loss on ``val``), chooses per-task operating points on ``val`` (the threshold reaching sensitivity 0.90 and the
one reaching specificity 0.90), and takes the NW support bank of the pretraining run's selected epoch, embedded by
the CT alone (screening has no tables).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from xcardia.atomic import write_text_atomic
from xcardia.errors import XcardiaError
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec, ProjectionHead
from xcardia.schema import CONCEPT_NAMES, LABELS

BUNDLE_FORMAT = "xcardia-screening-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: an integrity record (configs/integrity.json) over every file
#: The integrity record: sha256 of every other file of the bundle, written last by ``export``, verified first on load.
INTEGRITY = "configs/integrity.json"
#: Files that can carry pickled code: never part of a bundle.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".npz", ".joblib")
SENSITIVITY_TARGET = SPECIFICITY_TARGET = 0.90


class ScreeningNetwork(nn.Module):
    """CT (B, 1, X, Y, Z) → ten task logits (B, 10); :meth:`features` gives the 128-d feature the NW bank reads.

    Built from plain arguments so that a MONAI bundle config can instantiate it (``_target_``)."""

    def __init__(self, encoder_spec: dict, n_tasks: int = len(LABELS), feature_dim: int = 128):
        super().__init__()
        from xcardia.finetune import TopModel

        self.encoder = ImageEncoder(ImageEncoderSpec.from_dict(encoder_spec))
        self.top = TopModel(self.encoder, n_tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.encoder.trunk(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained encoder's own 128-d feature (what its projection and the NW bank were trained on)."""
        return self.encoder(x)


# ------------------------------------------------------------------------------------------ calibration
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_calibration(p: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """Per-task calibration of raw probabilities on labelled validation patients.

    Isotonic regression and Platt scaling (logistic regression on the logit), both scikit-learn; the one with the
    lower 5-fold cross-validated log-loss on these patients is kept and refitted on all of them. A task with fewer
    than 2 positives or negatives in validation is left uncalibrated (``method: "none"``, with the reason).

    Returns:
        ``{"method", "cv_log_loss": {method: value}, "isotonic": {"x", "y"} | None, "platt": {"a", "b"} | None}``.
    """
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    keep = ~np.isnan(y) & ~np.isnan(p)
    p, y = p[keep], y[keep].astype(int)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if min(n_pos, n_neg) < 2:
        return {"method": "none", "reason": f"{n_pos} positive(s) and {n_neg} negative(s) in val", "cv_log_loss": {}}

    def fit(method, pp, yy):
        if method == "isotonic":
            return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(pp, yy)
        return LogisticRegression(C=1e6, max_iter=1000).fit(_logit(pp)[:, None], yy)

    def apply(method, model, pp):
        return model.predict(pp) if method == "isotonic" else model.predict_proba(_logit(pp)[:, None])[:, 1]

    folds = StratifiedKFold(n_splits=min(5, n_pos, n_neg), shuffle=True, random_state=seed)
    losses = {}
    for method in ("isotonic", "platt"):
        out = np.empty(len(y))
        for train, test in folds.split(p, y):
            out[test] = apply(method, fit(method, p[train], y[train]), p[test])
        losses[method] = float(log_loss(y, np.clip(out, 1e-6, 1 - 1e-6), labels=[0, 1]))
    method = min(losses, key=losses.get)
    model = fit(method, p, y)
    result = {"method": method, "cv_log_loss": losses, "isotonic": None, "platt": None}
    if method == "isotonic":
        result["isotonic"] = {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}
    else:
        result["platt"] = {"a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}
    return result


def apply_calibration(p: np.ndarray, calibration: dict) -> np.ndarray:
    """Calibrated probabilities from raw ones with a task's :func:`fit_calibration` result."""
    p = np.asarray(p, dtype=float)
    if calibration["method"] == "isotonic":
        return np.interp(p, calibration["isotonic"]["x"], calibration["isotonic"]["y"])
    if calibration["method"] == "platt":
        z = calibration["platt"]["a"] * _logit(p) + calibration["platt"]["b"]
        return 1.0 / (1.0 + np.exp(-z))
    return p


def operating_points(p: np.ndarray, y: np.ndarray) -> dict:
    """Thresholds on ``p`` chosen on labelled patients: ``sensitivity_90`` — the highest threshold whose sensitivity
    (p ≥ t) is at least 0.90 — and ``specificity_90`` — the lowest whose specificity is at least 0.90; each with the
    sensitivity and specificity it reaches there. NaN where a class is absent."""
    keep = ~np.isnan(y) & ~np.isnan(p)
    p, y = p[keep], y[keep]
    out = {}
    pos, neg = p[y == 1], p[y == 0]
    if not len(pos) or not len(neg):
        nan = {"threshold": math.nan, "sensitivity": math.nan, "specificity": math.nan}
        return {"sensitivity_90": nan, "specificity_90": dict(nan)}
    candidates = np.unique(p)

    def at(t):
        return {"threshold": float(t), "sensitivity": float((pos >= t).mean()), "specificity": float((neg < t).mean())}

    sens_ok = [t for t in candidates if (pos >= t).mean() >= SENSITIVITY_TARGET]
    spec_ok = [t for t in candidates if (neg < t).mean() >= SPECIFICITY_TARGET]
    out["sensitivity_90"] = at(max(sens_ok)) if sens_ok else at(candidates.min())
    out["specificity_90"] = at(min(spec_ok)) if spec_ok else at(np.nextafter(candidates.max(), 2.0))
    return out


# ------------------------------------------------------------------------------------------ export
def _synthetic(manifest) -> bool:
    folder = Path(manifest.attrs.get("path", ".")).parent
    return (folder / "cohort.json").exists()


def _image_bank(run_dir: str, manifest, cache_dir) -> tuple[dict, dict] | None:
    """The selected epoch's NW exemplars embedded by their CT alone, with the run's image projection and τ."""
    from xcardia.embeddings import bank_exemplars, embed_run, load_run_model

    if not Path(run_dir).is_dir():
        return None
    exemplars = bank_exemplars(run_dir)
    if exemplars.empty:
        return None
    model, _, _ = load_run_model(run_dir)
    train = embed_run(run_dir, manifest, ("pretrain", "train"), cache_dir)
    position = {int(r): i for i, r in enumerate(train["rows"])}
    picks = [position[int(r)] for r in exemplars["row"] if int(r) in position]
    image = torch.nn.functional.normalize(torch.as_tensor(train["image"][picks]), dim=1)
    tensors = {"supports": image.contiguous(), "concepts": torch.as_tensor(train["concepts"][picks]).float().contiguous(),
               **{f"projection.{k}": v.contiguous() for k, v in model.image_projection.state_dict().items()}}
    ids = manifest["patient_id"].astype(str).to_numpy()[train["rows"][picks]].tolist()
    return tensors, {"temperature": float(model.nw_temperature().item()), "support_ids": ids,
                     "proj_dim": int(image.shape[1]), "query": "image"}


def export_bundle(out_dir: str | os.PathLike, profile, manifest_path: str | os.PathLike, init: str, name: str,
                  cache_dir=None, seed: int = 123, log=print) -> Path:
    """Train ``init`` with the ``paper`` protocol on every training label and write it as a screening bundle.

    Args:
        out_dir: the bundle folder (new, empty, or a bundle of this format, which is replaced).
        profile: the profile whose preprocessing and protocol are used.
        manifest_path: the cohort (train, val and test splits with labels).
        init: a pretraining run folder, an encoder file or ``scratch:K``.
        name: the bundle's name (e.g. the init's name).
        seed: the fine-tuning seed (the public sweep's first, 123).

    Returns:
        The bundle folder.
    """
    from xcardia import __version__
    from xcardia.data.manifest import load_manifest
    from xcardia.finetune import labelled_rows, predict_top, prepare_experiment, refuse_unfinished, train_top
    from xcardia.metrics import bootstrap_auroc_ci, expected_calibration_error

    out = Path(out_dir)
    _refuse_foreign_folder(out)
    manifest = load_manifest(manifest_path)
    cohort = Path(manifest.attrs["root"]).resolve()
    if out.resolve() == cohort or cohort in out.resolve().parents:
        raise XcardiaError(f"--out {out} is inside the cohort folder {cohort}; a bundle is never written among its "
                           f"inputs — give a folder elsewhere (nothing was written)")
    spec = profile.finetune
    refuse_unfinished(str(init), False, flag=None)  # export has no --allow-unfinished: a bundle is a finished model
    exp = prepare_experiment(profile, manifest, {name: init}, cache_dir or out.parent / "cache", spec, 0, log)
    encoded = exp.inits[name]
    train, val, test = labelled_rows(exp.labels, exp.rows["train"]), exp.rows["val"], exp.rows["test"]
    top = train_top(encoded, exp.labels, train, val, spec, seed)
    raw = {s: predict_top(top, encoded.trunk[torch.as_tensor(encoded.at(r))]) for s, r in (("val", val), ("test", test))}
    calibration, points, card_rows = {}, {}, []
    for t, task in enumerate(LABELS):
        calibration[task] = fit_calibration(raw["val"][:, t], exp.labels[val, t], seed)
        cal_val = apply_calibration(raw["val"][:, t], calibration[task])
        points[task] = operating_points(cal_val, exp.labels[val, t])
        cal_test = apply_calibration(raw["test"][:, t], calibration[task])
        ci = bootstrap_auroc_ci(exp.labels[test, t], raw["test"][:, t], n_boot=spec.n_boot, seed=seed)
        card_rows.append({"task": task, **ci, "ece_raw": expected_calibration_error(exp.labels[test, t], raw["test"][:, t]),
                          "ece_calibrated": expected_calibration_error(exp.labels[test, t], cal_test),
                          "calibration": calibration[task]["method"]})
    from xcardia.subgroups import subgroup_table

    calibrated_test = np.stack([apply_calibration(raw["test"][:, t], calibration[task]) for t, task in enumerate(LABELS)], 1)
    subgroups = subgroup_table(manifest.iloc[test].reset_index(drop=True), exp.labels[test], calibrated_test,
                               {task: {p: {"threshold": v["threshold"]} for p, v in points[task].items()}
                                for task in LABELS}, n_boot=spec.n_boot, seed=seed)
    network = ScreeningNetwork(encoded.encoder.spec.to_dict())
    network.encoder.load_state_dict(encoded.encoder.state_dict())
    network.top.load_state_dict(top.state_dict())
    shifted = shifted_scanner_check(manifest, test, network, calibration, profile.preprocess, calibrated_test,
                                    Path(cache_dir or out.parent / "cache") / "shifted_scans", spec.n_boot, seed)
    bank = _image_bank(init, manifest, cache_dir or out.parent / "cache")
    synthetic = _synthetic(manifest)
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(profile.preprocess).items()}
    metadata = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "version": "1.0.0", "name": name,
        "xcardia_version": __version__, "monai_version": _version("monai"), "pytorch_version": torch.__version__,
        "numpy_version": np.__version__, "required_packages_version": {"safetensors": _version("safetensors")},
        "task": "opportunistic cardiac screening on non-contrast chest CT: ten echocardiographic abnormalities",
        "description": f"{name}: image encoder fine-tuned with the public X-Cardia fine-tuning protocol on every "
                       f"training label, calibrated and thresholded on the validation split",
        "authors": "xcardia companion", "copyright": "see the repository licence",
        "trained_on": {"synthetic": synthetic, "cohort": str(Path(manifest.attrs["path"]).parent.name),
                       "n_train": int(len(train)), "n_val": int(len(val)), "n_test": int(len(test)),
                       "profile": profile.name, "init": str(init), "fine_tuning_seed": seed},
        "intended_use": "research and teaching; " + ("NOT FOR CLINICAL USE: trained on a synthetic cohort" if synthetic
                                                     else "not validated for clinical use"),
        "tasks": list(LABELS), "concepts": list(CONCEPT_NAMES),
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(profile.preprocess.shape), "dtype": "float32",
                                 "value_range": [-1, 1], "is_patch_data": False,
                                 "channel_def": {"0": "non-contrast chest CT, HU windowed to [-1, 1]"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "multi-label", "num_channels": len(LABELS),
                                 "spatial_shape": [], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {str(i): t for i, t in enumerate(LABELS)}}}},
        "test_metrics": card_rows,
        "test_subgroups": subgroups.to_dict(orient="records"),
        "test_shifted_scanner": shifted,
    }
    inference = {
        "imports": ["$import xcardia.bundle"],
        "bundle_root": ".",
        "preprocessing": preprocess,
        "network_def": {"_target_": "xcardia.bundle.ScreeningNetwork", "encoder_spec": encoded.encoder.spec.to_dict(),
                        "n_tasks": len(LABELS)},
        "calibration": calibration,
        "operating_points": points,
        "nw_bank": bank[1] if bank else None,
        "qc": {"fail_on": ["error", "contrast"]},
    }
    _write_bundle_into_place(out, network, bank, inference, metadata)
    log(f"[export] screening bundle {name}: {out}")
    return out


def _write_bundle_into_place(out: Path, network, bank, inference: dict, metadata: dict) -> None:
    """Write the bundle into a temporary sibling folder, then rename it into place, under a lock: a reader never sees
    a half-written bundle, and two exports to one ``--out`` cannot interleave their files (the second is told which
    process holds it)."""
    import shutil

    from safetensors.torch import save_file

    from xcardia.run_folder import RunLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(out.parent / f".{out.name}.export", "bundle export"):
        _refuse_foreign_folder(out)  # again, under the lock
        staging = out.parent / f".{out.name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir(parents=True)
        state = {k: v.contiguous() for k, v in network.state_dict().items()}
        save_file(state, str(staging / "models" / "model.safetensors"))
        if bank:
            save_file(bank[0], str(staging / "models" / "support_bank.safetensors"))
        (staging / "configs" / "inference.json").write_text(json.dumps(_jsonable(inference), indent=1) + "\n")
        (staging / "docs" / "README.md").write_text(model_card(metadata, inference))
        (staging / "configs" / "metadata.json").write_text(json.dumps(_jsonable(metadata), indent=1) + "\n")
        write_integrity(staging)  # last: a bundle without it is unfinished
        retired = out.parent / f".{out.name}.replaced"
        shutil.rmtree(retired, ignore_errors=True)
        if out.exists():
            os.replace(out, retired)  # an earlier bundle of this format at --out is replaced whole
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_files(root: Path) -> dict[str, str]:
    """sha256 of every file of the bundle at ``root`` but the integrity record, by relative path. Only regular files
    are read: a FIFO, socket, device or symlink is refused in one line (a FIFO would block the read forever)."""
    import stat

    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise XcardiaError(f"--model {root}: {rel} is not a regular file (a link, FIFO or device); a bundle holds "
                               f"regular files only — re-export it")
        if rel != INTEGRITY:
            out[rel] = _sha256(path)
    return out


def bundle_digest(files: dict[str, str]) -> str:
    """One sha256 for the whole bundle: over its sorted (path, sha256) list. Screening records carry it."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def write_integrity(root: Path) -> dict:
    """Write ``configs/integrity.json``: the sha256 of every file of the bundle and the bundle digest."""
    files = bundle_files(root)
    record = {"algorithm": "sha256", "files": files, "bundle_sha256": bundle_digest(files)}
    write_text_atomic(root / INTEGRITY, json.dumps(record, indent=1) + "\n")
    return record


def verify_integrity(root: Path) -> str:
    """Check the bundle against its integrity record before anything in it is used; return the bundle digest.

    Raises:
        XcardiaError: no record (an unfinished or pre-integrity export), a file changed, missing or added since
            export, or a file that is not a regular file — each in one line naming the file.
    """
    path = root / INTEGRITY
    if not path.is_file():
        raise XcardiaError(f"--model {root}: no {INTEGRITY} (the export did not finish, or predates integrity "
                           f"records); re-export the bundle")
    try:
        record = json.loads(path.read_text())
        expected = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise XcardiaError(f"--model {root}: {INTEGRITY} is unreadable; re-export the bundle") from None
    actual = bundle_files(root)
    for rel in sorted(expected):
        if rel not in actual:
            raise XcardiaError(f"--model {root}: {rel} is missing since export; re-export the bundle")
        if actual[rel] != expected[rel]:
            raise XcardiaError(f"--model {root}: edited after export: {rel} (its sha256 differs from "
                               f"{INTEGRITY}); re-export the bundle instead of editing it")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise XcardiaError(f"--model {root}: {extra[0]} was not part of the export; remove it or re-export")
    return bundle_digest(actual)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _jsonable(x):
    from xcardia.atomic import to_jsonable

    return to_jsonable(x)


def _refuse_foreign_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise XcardiaError(f"--out {out} is a file; give a folder for the bundle (nothing was written)")
    if out.is_dir() and any(out.iterdir()) and not (out / "configs" / "metadata.json").exists():
        raise XcardiaError(f"--out {out} is a non-empty folder that is not a screening bundle; give a new or empty "
                           f"folder (nothing was written)")


def model_card(metadata: dict, inference: dict) -> str:
    """The bundle's ``docs/README.md``."""
    synthetic = metadata["trained_on"]["synthetic"]
    lines = [f"# Screening model `{metadata['name']}`", ""]
    if synthetic:
        lines += ["**NOT FOR CLINICAL USE. This model was trained on the synthetic digital-twin cohort of the xcardia "
                  "companion: its patients, CTs and labels are simulated. Its numbers say nothing about real "
                  "patients.**", ""]
    else:
        lines += ["**Not validated for clinical use.** Trained on a local cohort; it needs external validation, a "
                  "check of prevalence shift and a reader study before any use on patients.", ""]
    t = metadata["trained_on"]
    lines += ["## What it is", "",
              f"{metadata['description']}. Init: `{t['init']}` (profile `{t['profile']}`); {t['n_train']} training, "
              f"{t['n_val']} validation and {t['n_test']} test patients; fine-tuning seed {t['fine_tuning_seed']}.", "",
              "Input: one non-contrast chest CT (NIfTI or a DICOM series), resampled and cropped as "
              f"`configs/inference.json` → `preprocessing` says ({inference['preprocessing']['shape']} voxels at "
              f"{inference['preprocessing']['spacing_mm']} mm, HU window {inference['preprocessing']['hu_window']}). "
              "A CT that fails series QC (no lungs, contrast-enhanced, unreadable) is listed with its reason and never "
              "scored.", "",
              "Output per patient: ten calibrated risks (calibration fitted on the validation split), a flag at two "
              "operating points chosen on validation (sensitivity 0.90; specificity 0.90), and four NW concept "
              "estimates from the pretraining run's exemplar bank, embedded by the CT alone.", "",
              "## Test performance (held-out test split)", "",
              "| task | AUROC [95% CI] | positives / negatives | ECE raw → calibrated | calibration |",
              "|---|---|---|---|---|"]
    for row in metadata["test_metrics"]:
        auc = "–" if row["auroc"] is None or (isinstance(row["auroc"], float) and math.isnan(row["auroc"])) else \
            f"{row['auroc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        ece = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {row['task']} | {auc} | {row['n_pos']} / {row['n_neg']} | {ece(row['ece_raw'])} → "
                     f"{ece(row['ece_calibrated'])} | {row['calibration']} |")
    lines += subgroup_card_section(metadata.get("test_subgroups") or [], synthetic)
    lines += shifted_card_section(metadata.get("test_shifted_scanner"))
    lines += ["", "## Intended use and limits", "", metadata["intended_use"] + ".",
              "Operating points were chosen on the validation split at its prevalence; at another prevalence the "
              "positive predictive value changes (notebook 06 shows by how much). Non-contrast, non-gated chest CT "
              "only; the heart-centred crop follows a heart mask when one is given, a heuristic otherwise.", ""]
    if synthetic:
        lines += ["**What the synthetic cohort can and cannot show about subgroups.** The generator models some "
                  "sex and age effects — sex-specific body size, chamber volumes and wall thickness (ASE/EACVI 2015 "
                  "normals), haemoglobin and so blood attenuation, subcutaneous fat; age raising aortic stenosis, atrial "
                  "fibrillation, hypertension, wall thickness, PASP and coronary calcium — so the subgroup table above "
                  "shows how *those* modelled differences move the numbers. It does not model what matters most in "
                  "practice: differences in disease presentation it was not told about, race and ethnicity, body "
                  "habitus beyond BMI, scanner vendors, reconstruction kernels, contrast timing, or who gets referred "
                  "for an echo. Its subgroup gaps are therefore not evidence for or against bias on real patients.", ""]
    lines += ["**What a site must measure on its own data before any use.** AUROC, calibration (slope and "
              "intercept) and sensitivity/specificity at the chosen operating point, with intervals, overall and by "
              "sex, age band and any other group the site serves; the same on scans of each scanner and protocol it "
              "runs (the shifted-scanner check in notebook 06 is the mechanics of such a test); and the prevalence of "
              "each finding in the population it will screen, since PPV follows it.", ""]
    return "\n".join(lines)


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_interval(row: dict, key: str, low: str, high: str, digits: int = 2) -> str:
    value = _fmt(row.get(key), digits)
    if value == "–" or row.get(low) is None or (isinstance(row.get(low), float) and math.isnan(row[low])):
        return value
    return f"{value} [{_fmt(row[low], digits)}, {_fmt(row[high], digits)}]"


INFERENCE_KEYS = {"imports", "bundle_root", "preprocessing", "network_def", "calibration", "operating_points", "nw_bank",
                  "qc"}
OPERATING_POINTS = ("sensitivity_90", "specificity_90")


def validate_bundle_configs(root: Path, metadata: dict, inference: dict, state: dict | None = None) -> None:
    """Check ``configs/metadata.json`` and ``configs/inference.json`` (and the weights' dtypes and shapes) against
    what this xcardia writes, before any number is computed from them. Every violation is one line naming the file
    and the key, e.g. ``configs/inference.json: operating_points.shd_flag.sensitivity_90.threshold = 5.0 is not in
    [0, 1]``. An intact record cannot vouch for a bundle that a faulty or foreign exporter wrote with bad values.

    Raises:
        XcardiaError: the first violation found.
    """
    meta_file, inf_file = "configs/metadata.json", "configs/inference.json"

    def fail(file: str, key: str, what: str):
        raise XcardiaError(f"--model {root}: {file}: {key} {what}; re-export the bundle")

    def number(file, key, value, low=-math.inf, high=math.inf, *, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(file, key, f"= {value!r} is not a number")
        if not math.isfinite(float(value)):
            fail(file, key, f"= {value!r} is not finite")
        if not low <= float(value) <= high:
            fail(file, key, f"= {value!r} is not in [{low:g}, {high:g}]")

    if not isinstance(metadata, dict):
        fail(meta_file, "the file", "is not a JSON object")
    for key in ("name", "trained_on", "tasks"):
        if key not in metadata:
            fail(meta_file, key, "is missing")
    if not isinstance(metadata["trained_on"], dict) or not isinstance(metadata["trained_on"].get("synthetic"), bool):
        fail(meta_file, "trained_on.synthetic", "must be true or false")
    if list(metadata["tasks"]) != list(LABELS):
        fail(meta_file, "tasks", f"are not the ten tasks this xcardia scores ({', '.join(LABELS)})")
    if not isinstance(inference, dict):
        fail(inf_file, "the file", "is not a JSON object")
    for key in sorted(INFERENCE_KEYS - set(inference)):
        fail(inf_file, key, "is missing")
    for key in sorted(set(inference) - INFERENCE_KEYS):
        fail(inf_file, key, "is not a key this xcardia writes")
    pre = inference["preprocessing"]
    from dataclasses import fields

    from xcardia.data.imaging import PreprocessSpec

    names = {f.name for f in fields(PreprocessSpec)}
    if not isinstance(pre, dict) or set(pre) != names:
        fail(inf_file, "preprocessing", f"must have exactly the keys {', '.join(sorted(names))}")
    shape = pre["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v >= 16 for v in shape)):
        fail(inf_file, "preprocessing.shape", f"= {shape!r} is not three voxel counts ≥ 16")
    number(inf_file, "preprocessing.spacing_mm", pre["spacing_mm"], 1e-3, 100.0)
    window = pre["hu_window"]
    if not (isinstance(window, list) and len(window) == 2):
        fail(inf_file, "preprocessing.hu_window", f"= {window!r} is not [low, high]")
    for k, v in enumerate(window):
        number(inf_file, f"preprocessing.hu_window[{k}]", v, -2000.0, 4000.0)
    if window[0] >= window[1]:
        fail(inf_file, "preprocessing.hu_window", f"= {window!r} is not increasing")
    declared = (((metadata.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}).get("spatial_shape")
    if declared != shape:
        fail(inf_file, "preprocessing.shape", f"= {shape} differs from the network's declared input "
             f"{declared} (configs/metadata.json network_data_format.inputs.image.spatial_shape)")
    net = inference["network_def"]
    if not isinstance(net, dict) or net.get("_target_") != "xcardia.bundle.ScreeningNetwork":
        fail(inf_file, "network_def._target_", f"= {net.get('_target_') if isinstance(net, dict) else net!r} is not "
             f"xcardia.bundle.ScreeningNetwork, the network this xcardia builds")
    if net.get("n_tasks") != len(LABELS) or not isinstance(net.get("encoder_spec"), dict):
        fail(inf_file, "network_def", f"must have n_tasks = {len(LABELS)} and an encoder_spec object")
    for section in ("calibration", "operating_points"):
        if not isinstance(inference[section], dict):
            fail(inf_file, section, "is not an object")
        for task in LABELS:
            if task not in inference[section]:
                fail(inf_file, f"{section}.{task}", "is missing (every task needs one)")
    for task in LABELS:
        cal, key = inference["calibration"][task], f"calibration.{task}"
        method = cal.get("method") if isinstance(cal, dict) else None
        if method not in ("none", "platt", "isotonic"):
            fail(inf_file, f"{key}.method", f"= {method!r} is not none, platt or isotonic")
        if method == "platt":
            for coefficient in ("a", "b"):
                number(inf_file, f"{key}.platt.{coefficient}", (cal.get("platt") or {}).get(coefficient))
        if method == "isotonic":
            xs, ys = (cal.get("isotonic") or {}).get("x"), (cal.get("isotonic") or {}).get("y")
            if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) and len(xs) >= 1):
                fail(inf_file, f"{key}.isotonic", "needs x and y lists of the same, non-zero length")
            for axis, values in (("x", xs), ("y", ys)):
                for k, v in enumerate(values):
                    number(inf_file, f"{key}.isotonic.{axis}[{k}]", v, 0.0, 1.0)
                if any(b < a for a, b in zip(values, values[1:])):
                    fail(inf_file, f"{key}.isotonic.{axis}", "is not monotone (non-decreasing)")
        points = inference["operating_points"][task]
        for point in OPERATING_POINTS:
            entry = points.get(point) if isinstance(points, dict) else None
            if not isinstance(entry, dict):
                fail(inf_file, f"operating_points.{task}.{point}", "is missing")
            for field in ("threshold", "sensitivity", "specificity"):
                number(inf_file, f"operating_points.{task}.{point}.{field}", entry.get(field), 0.0, 1.0,
                       allow_none=True)
    bank = inference["nw_bank"]
    if bank is not None:
        if not isinstance(bank, dict):
            fail(inf_file, "nw_bank", "is neither null nor an object")
        number(inf_file, "nw_bank.temperature", bank.get("temperature"), 1e-6, 1e6)
        if not isinstance(bank.get("proj_dim"), int) or not isinstance(bank.get("support_ids"), list):
            fail(inf_file, "nw_bank", "needs an integer proj_dim and a support_ids list")
    fail_on = (inference["qc"] or {}).get("fail_on") if isinstance(inference["qc"], dict) else None
    if not (isinstance(fail_on, list) and all(isinstance(v, str) for v in fail_on)):
        fail(inf_file, "qc.fail_on", "must be a list of QC finding names")
    if state is not None:
        reference = ScreeningNetwork(net["encoder_spec"], len(LABELS)).state_dict()
        for name, tensor in state.items():
            if name in reference and (tensor.dtype != reference[name].dtype or tuple(tensor.shape) != tuple(reference[name].shape)):
                fail("models/model.safetensors", name, f"is {tensor.dtype} {tuple(tensor.shape)}, the network "
                     f"declares {reference[name].dtype} {tuple(reference[name].shape)}")


def shifted_scanner_check(manifest, rows, network, calibration: dict, preprocess, risk_original: np.ndarray,
                          folder, n_boot: int = 200, seed: int = 0) -> dict | None:
    """The model card's shifted-scanner check (:data:`xcardia.subgroups.SHIFT`): the test patients at ``rows``
    re-rendered on the shifted scanner into ``folder``, preprocessed as a screen would (a scan that preprocessing's
    series QC refuses is counted with its reason, never scored), scored by ``network`` with the bundle's
    ``calibration``, and set beside their original calibrated risks (:func:`xcardia.subgroups.shift_table`). None for
    a real cohort, which cannot be re-rendered.

    Returns:
        ``{"shift", "n", "qc_passed", "qc_reasons", "table"}`` (the pairs are the patients whose shifted scan passed).
    """
    from xcardia.cohort.describe import synthetic_spec
    from xcardia.data.imaging import preprocess_ct
    from xcardia.subgroups import SHIFT, render_shifted_scans, shift_table

    if synthetic_spec(manifest) is None:
        return None
    rows = np.asarray(rows)
    shifted = pd.read_csv(render_shifted_scans(manifest, rows, folder, SHIFT))
    keep, risks, reasons = [], [], {}
    network.eval()
    for k, rel in enumerate(shifted["ct_path"]):
        try:
            volume = preprocess_ct(Path(folder) / rel, preprocess)
        except XcardiaError as exc:
            reason = str(exc).split(": ")[-1][:80]
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        with torch.no_grad():
            raw = torch.sigmoid(network(torch.as_tensor(volume)[None, None]))[0].numpy()
        risks.append([float(apply_calibration(raw[t:t + 1], calibration[task])[0]) for t, task in enumerate(LABELS)])
        keep.append(k)
    labels = manifest[list(LABELS)].to_numpy(dtype=float)[rows]
    table = (shift_table(labels[keep], risk_original[keep], np.array(risks), n_boot=n_boot, seed=seed)
             if keep else pd.DataFrame())
    return {"shift": dict(SHIFT), "n": int(len(rows)), "qc_passed": int(len(keep)), "qc_reasons": reasons,
            "table": table.to_dict(orient="records")}


def shifted_card_section(check: dict | None) -> list[str]:
    """The model card's shifted-scanner section: the same test patients on a shifted (low-dose) scanner — QC, and
    per task the AUROC on both scans, the paired difference with its interval, and the calibration slope on each."""
    if not check:
        return []
    out = ["", f"## On a shifted scanner: {check['shift']['name']}", "",
           f"The {check['n']} test patients re-rendered by the generator with the noise SD multiplied by "
           f"{check['shift']['noise_factor']:g} (capped at {check['shift']['noise_cap_hu']:g} HU) — same anatomy, "
           f"cardiac phase, position and labels — and scored by this model: {check['qc_passed']} of {check['n']} passed "
           f"preprocessing's series QC" + (f" (failed: {', '.join(f'{k} {v}' for k, v in check['qc_reasons'].items())})"
                              if check["qc_reasons"] else "") +
           ". AUROC difference shifted − original on the same patients with a 95 % patient-bootstrap interval; a task "
           "with fewer than 5 positives or negatives gets no interval.", "",
           "| task | n+ / n− | AUROC original | AUROC shifted | difference | calibration slope original → shifted |",
           "|---|---|---|---|---|---|"]
    for row in check["table"]:
        out.append(f"| {row['task']} | {row['n_pos']} / {row['n_neg']} | {_fmt(row['auroc_original'], 3)} | "
                   f"{_fmt(row['auroc_shifted'], 3)} | {_with_interval(row, 'difference', 'difference_low', 'difference_high', 3)} | "
                   f"{_fmt(row['calibration_slope_original'])} → {_fmt(row['calibration_slope_shifted'])} |")
    return out


def subgroup_card_section(rows: list[dict], synthetic: bool) -> list[str]:
    """The model card's subgroup table (test split): per task and subgroup, counts, AUROC, calibration slope and
    intercept, and the operating points' sensitivity/specificity/PPV — intervals where both classes have enough
    patients (:mod:`xcardia.subgroups`)."""
    from xcardia.subgroups import AGE_BANDS, MIN_PER_CLASS

    if not rows:
        return []
    bands = ", ".join(name.replace("age ", "") for _, _, name in AGE_BANDS)
    out = ["", "## Performance by subgroup (held-out test split)", "",
           f"Subgroups fixed before any subgroup number existed: sex, and age bands {bands} (years). 95 % intervals: "
           f"patient bootstrap (AUROC, calibration) and Wilson (sensitivity, specificity, PPV); a subgroup with fewer "
           f"than {MIN_PER_CLASS} positives or negatives for a task gets point estimates only (\"too small\"). "
           "Calibration slope 1 and intercept 0 are perfect; sens-90 / spec-90 are the operating points chosen on "
           "validation." + (" Synthetic cohort: see the limits below." if synthetic else ""), "",
           "| task | subgroup | n+ / n− | AUROC | calibration slope | intercept | sensitivity (sens-90) | "
           "specificity (spec-90) | PPV (spec-90) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        small = row.get("interval") != "yes"
        out.append(" | ".join([
            f"| {row['task']}", row["subgroup"], f"{row['n_pos']} / {row['n_neg']}" + (" (too small)" if small else ""),
            _with_interval(row, "auroc", "auroc_low", "auroc_high"),
            _with_interval(row, "calibration_slope", "slope_low", "slope_high"),
            _with_interval(row, "calibration_intercept", "intercept_low", "intercept_high"),
            _with_interval(row, "sensitivity_90_sensitivity", "sensitivity_90_sensitivity_low", "sensitivity_90_sensitivity_high"),
            _with_interval(row, "specificity_90_specificity", "specificity_90_specificity_low", "specificity_90_specificity_high"),
            _with_interval(row, "specificity_90_ppv", "specificity_90_ppv_low", "specificity_90_ppv_high")]) + " |")
    return out


# ------------------------------------------------------------------------------------------ loading
def load_bundle(model_dir: str | os.PathLike) -> dict:
    """The bundle in ``model_dir``: ``{"metadata", "inference", "network", "bank", "preprocess", "root", "digest"}``.

    Checks, in order, each refusal one line: the marker, no pickle-capable file, the format version, the integrity
    record (every file as exported, nothing added, regular files only), then the configs and the weights.

    Raises:
        XcardiaError: not a bundle, another format version, a pickle-capable file inside, a file edited, missing or
            added since export, unreadable weights.
    """
    from safetensors.torch import load_file

    from xcardia.data.imaging import PreprocessSpec

    root = Path(model_dir)
    meta_path = root / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise XcardiaError(f"--model {root}: no configs/metadata.json; pass a folder written by `xcardia export`")
    pickled = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise XcardiaError(f"--model {root}: holds {', '.join(pickled)}, a format that can carry pickled code; a "
                           f"bundle carries safetensors and JSON only — remove it or re-export")
    try:
        metadata = json.loads(meta_path.read_text()) if os.path.isfile(meta_path) else None
    except (OSError, ValueError) as exc:
        raise XcardiaError(f"--model {root}: unreadable bundle configuration ({exc}); re-export the bundle") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT or version != BUNDLE_FORMAT_VERSION:
        raise XcardiaError(f"--model {root}: format {metadata.get('format') if isinstance(metadata, dict) else None!r} "
                           f"version {version!r}; this xcardia reads {BUNDLE_FORMAT!r} version "
                           f"{BUNDLE_FORMAT_VERSION} — re-export the bundle with this version")
    digest = verify_integrity(root)  # before any other file is read: nothing edited, added or swapped for a FIFO
    try:
        inference = json.loads((root / "configs" / "inference.json").read_text())
    except (OSError, ValueError) as exc:
        raise XcardiaError(f"--model {root}: unreadable bundle configuration ({exc}); re-export the bundle") from None
    validate_bundle_configs(root, metadata, inference)
    try:
        state = load_file(str(root / "models" / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - e.g. a pickle renamed .safetensors
        raise XcardiaError(f"--model {root}: models/model.safetensors is not a safetensors file "
                           f"({type(exc).__name__}); re-export the bundle") from None
    validate_bundle_configs(root, metadata, inference, state)
    try:
        network = ScreeningNetwork(inference["network_def"]["encoder_spec"], int(inference["network_def"]["n_tasks"]))
        network.load_state_dict(state, strict=True)
        bank = None
        if inference.get("nw_bank"):
            tensors = load_file(str(root / "models" / "support_bank.safetensors"))
            projection = ProjectionHead(network.encoder.spec.feature_dim, int(inference["nw_bank"]["proj_dim"]))
            projection.load_state_dict({k[len("projection."):]: v for k, v in tensors.items()
                                        if k.startswith("projection.")}, strict=True)
            bank = {"supports": tensors["supports"], "concepts": tensors["concepts"], "projection": projection.eval(),
                    **inference["nw_bank"]}
    except XcardiaError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise XcardiaError(f"--model {root}: cannot load the weights ({type(exc).__name__}: {first}); re-export "
                           f"the bundle") from None
    pre = dict(inference["preprocessing"])
    for key in ("shape", "hu_window"):
        pre[key] = tuple(pre[key])
    return {"metadata": metadata, "inference": inference, "network": network.eval(), "bank": bank,
            "preprocess": PreprocessSpec(**pre), "root": root, "digest": digest}
