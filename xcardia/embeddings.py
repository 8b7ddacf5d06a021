"""Embeddings of patients under a pretrained model, and analyses built on them (NW query comparison).

:func:`embed_run` loads one epoch of a pretraining run whole (``selected.pt``: the epoch the paper's rule chose),
embeds the patients of chosen splits and caches the result in ``<run>/embeddings/`` keyed by the manifest and
the patients, so notebooks 02 and 03 compute each embedding once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xcardia.schema import CONCEPT_NAMES
from xcardia.data.dataset import CohortDataset
from xcardia.data.imaging import PreprocessCache, PreprocessSpec
from xcardia.atomic import write_atomic
from xcardia.losses import nw_predict
from xcardia.metrics import concept_metrics
from xcardia.models.tabular_encoder import TabularPreprocessor
from xcardia.models.xcardia_model import ModelSpec, XCardiaModel
from xcardia.run_folder import RunFolder
from xcardia.support_bank import SupportBank, kmeans_exemplars


def load_run_model(run_dir: str | os.PathLike, which: str = "selected") -> tuple[XCardiaModel, TabularPreprocessor, dict]:
    """The full pretraining model of one epoch of a run — image encoder, tabular tower, projections and
    temperatures all from that epoch (never an encoder of one epoch beside a tabular tower of another) — with its
    tabular preprocessing and the run configuration."""
    state = RunFolder(run_dir).load_state(which)
    config = state["config"]
    pre = TabularPreprocessor.from_state_dict(state["tabular"])
    model = XCardiaModel(ModelSpec.from_dict(config["model"]), len(pre.columns))
    model.load_state_dict(state["model"])
    return model.eval(), pre, config


def run_bank(run_dir: str | os.PathLike, which: str = "selected") -> SupportBank | None:
    """The support bank the run's NW head used at that epoch's validation (unfilled queue slots dropped)."""
    return RunFolder(run_dir).bank(which)


def _run_preprocess(config: dict) -> PreprocessSpec:
    """The preprocessing a run was trained with, from its configuration."""
    return PreprocessSpec(**{**config["preprocess"], "shape": tuple(config["preprocess"]["shape"]),
                             "hu_window": tuple(config["preprocess"]["hu_window"])})


def _key(manifest: pd.DataFrame, rows: np.ndarray, run: RunFolder, which: str) -> str:
    blob = json.dumps({"manifest": manifest.attrs.get("path"), "rows": rows.tolist(), "which": which,
                       "state_mtime": run.state_file(which).stat().st_mtime_ns})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def embed_run(run_dir: str | os.PathLike, manifest: pd.DataFrame, splits=("train",), cache_dir=None,
              batch_size: int = 64, which: str = "selected") -> dict[str, np.ndarray]:
    """Embeddings of the patients of ``splits``.

    Returns:
        ``feature`` (N, 128) image features (what downstream models use), ``image`` and ``tabular`` (N, 256)
        projections, ``concepts`` (N, 4), ``labels`` (N, 10), ``rows`` (N,) manifest positions.
    """
    run = RunFolder(run_dir)
    rows = np.flatnonzero(manifest["split"].astype(str).isin(splits).to_numpy())
    cache_file = run.embeddings / f"{'-'.join(splits)}_{_key(manifest, rows, run, which)}.npz"
    if cache_file.exists():
        return dict(np.load(cache_file))
    model, pre, config = load_run_model(run, which)
    preprocess = _run_preprocess(config)
    cache = PreprocessCache(Path(cache_dir) if cache_dir else run.default_cache(), preprocess)
    ds = CohortDataset(manifest, rows, cache, pre.transform(manifest), None, 0, in_memory=False)
    out: dict[str, list] = {"feature": [], "image": [], "tabular": [], "concepts": [], "labels": [], "rows": []}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for batch in loader:
        feature = model.image_encoder(batch["image"])
        out["feature"].append(feature)
        out["image"].append(model.image_projection(feature))
        out["tabular"].append(model.embed_tabular(batch["tab_values"], batch["tab_missing"]))
        out["concepts"].append(batch["concepts"])
        out["labels"].append(batch["labels"])
        out["rows"].append(batch["index"])
    arrays = {k: torch.cat(v).numpy() for k, v in out.items()}
    write_atomic(cache_file, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
    return arrays


def _query(emb: dict, mode: str) -> torch.Tensor:
    return XCardiaModel.nw_query(torch.as_tensor(emb["image"]), torch.as_tensor(emb["tabular"]), mode)


def nw_query_comparison(run_dir, manifest: pd.DataFrame, cache_dir=None, k_per_concept: int = 5,
                        temperatures=None, seed: int = 0) -> pd.DataFrame:
    """Validation concept AUROC of NW predictions with the fused query (paper) and the image-only query.

    For each query kind, the support bank is the paper's k-means exemplars of the training patients embedded
    the same way; the temperature is the run's (learned or fixed) NW τ unless ``temperatures`` are given.
    """
    model, _, _ = load_run_model(run_dir)
    train = embed_run(run_dir, manifest, ("pretrain", "train"), cache_dir)
    val = embed_run(run_dir, manifest, ("val",), cache_dir)
    taus = temperatures or [model.nw_temperature().item()]
    rows = []
    for mode in ("fused", "image"):
        support = _query(train, mode)
        picks = kmeans_exemplars(support.numpy(), train["concepts"], k_per_concept, seed)
        for tau in taus:
            pred, _ = nw_predict(_query(val, mode), support[picks], torch.as_tensor(train["concepts"][picks]), tau)
            scores = concept_metrics(pred.numpy(), val["concepts"])
            rows.append({"query": mode, "nw_temperature": tau,
                         **{name: scores[f"{name}_auroc"] for name in CONCEPT_NAMES}, "mean": scores["concept_auroc"]})
    return pd.DataFrame(rows)


def bank_exemplars(run_dir: str | os.PathLike, which: str = "selected") -> pd.DataFrame:
    """The support bank of the selected (or last) epoch: manifest row of each exemplar and its concept targets."""
    bank = run_bank(run_dir, which)
    if bank is None:
        return pd.DataFrame(columns=["row", *CONCEPT_NAMES])
    frame = pd.DataFrame(bank.targets.numpy(), columns=list(CONCEPT_NAMES))
    frame.insert(0, "row", bank.indices.numpy())
    return frame.reset_index(drop=True)


def one_batch(run_dir: str | os.PathLike, manifest: pd.DataFrame, n: int = 16, cache_dir=None, seed: int = 0,
              which: str = "selected") -> tuple[XCardiaModel, dict]:
    """A run's model at one epoch and ``n`` random training patients as one batch (``image``, ``tab_values``,
    ``tab_missing``, ``concepts``): what notebook 02 pushes through the method by hand."""
    run = RunFolder(run_dir)
    model, pre, config = load_run_model(run, which)
    preprocess = _run_preprocess(config)
    cache = PreprocessCache(Path(cache_dir) if cache_dir else run.default_cache(), preprocess)
    train = np.flatnonzero(manifest["split"].astype(str).isin(("pretrain", "train")).to_numpy())
    rows = np.sort(np.random.default_rng(seed).choice(train, size=min(n, len(train)), replace=False))
    ds = CohortDataset(manifest, rows, cache, pre.transform(manifest), None, 0, in_memory=False)
    return model, next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds), shuffle=False)))
