"""Downstream evaluation: fine-tuning protocols, label-fraction sweep and true k-shot, on the ten tasks.

Protocols (docs/method.md §5–§6), for any encoder init (``scratch`` or a pretraining run / encoder file):

- ``paper``: the public ``Finetune/Finetuning.py``, item by item: the encoder frozen except its last ResNet stage,
  the 2048/128 → 128 feature layer after it re-initialised, ten heads trained with masked BCE, AdamW (5e-3, weight
  decay 1e-3) under a cosine OneCycle (5e-3 → 5e-4) stepped per micro-batch, micro-batches of 12 with 2-step
  gradient accumulation and norm clipping at 1.0, the trained stage's BatchNorm in training mode, early stopping on
  validation macro AUROC (≤ 100 epochs, patience 6, min_delta 1e-4, at least 6 epochs), the best epoch tested. The
  one intended difference is defect 7: ``pos_weight`` is counted on the subset actually trained on. The frozen
  part's output is computed once per init (in eval mode: the public code also lets the frozen stages' BatchNorm
  statistics drift in training mode — a difference the register states), which makes thousands of runs
  affordable on a CPU. Every hyper-parameter is pinned to its public line by ``tests/test_protocol_pinning.py``.
- ``scratch_all``: the public code's no-pretraining baseline: every layer trained from random weights, with the
  same optimiser, schedule and stopping rule. (``paper`` applied to ``scratch`` is the like-for-like scratch.)
- ``probe``: logistic regression (scikit-learn) per task on the frozen encoder's 128-d features.

Settings: label fractions of the training split (the public sweep: fractions × seeds 123/456/789, random rows of the
patients with at least one label, drawn as ``Finetuning.py:351-358`` draws them) and true k-shot (k positives and k
negatives per task from the training split, the patient ids written out). The public code has no k-shot sampler:
k-shot here runs the ``paper`` protocol's schedule for a fixed number of epochs with no early stopping, since a
5-shot user has no labelled validation set. The draws of pretraining seed K are their own (draw seed d + 1000·K),
shared by every init of seed K, so paired differences stay paired and the seed-level interval includes the
variance of which patients were drawn.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from xcardia.schema import LABELS
from xcardia.data.dataset import CohortDataset, table_array
from xcardia.data.imaging import PreprocessCache, PreprocessSpec
from xcardia.atomic import write_atomic, write_text_atomic
from xcardia.errors import XcardiaError
from xcardia.losses import masked_bce_with_logits, pos_weight_from_subset, public_optimizer
from xcardia.metrics import auprc, auroc
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec
from xcardia.models.weights import load_encoder
from xcardia.run_folder import RunFolder, RunLock, cohort_fingerprint, describe_cohort_change

PROTOCOLS = ("paper", "probe", "scratch_all")


from xcardia.specs import FinetuneSpec  # noqa: F401 - the evaluation spec, re-exported


# ------------------------------------------------------------------------------------------ subsets
def fraction_subset(train_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A random ``fraction`` of the training rows (at least one), drawn as the public sweep draws them
    (``Finetuning.py:351-358``: ``RandomState(seed + round(1000·fraction))``, ``floor(fraction · n)`` rows)."""
    n = max(1, int(math.floor(fraction * len(train_rows))))
    rng = np.random.RandomState(seed + int(round(fraction * 1000)))
    return np.sort(np.asarray(train_rows)[rng.choice(len(train_rows), size=n, replace=False)])


def labelled_rows(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows with at least one task label (the public code drops the others first, ``Finetuning.py:279-287``)."""
    return rows[~np.isnan(labels[rows]).all(axis=1)]


#: k-shot draw seeds of pretraining seed K are ``draw + KSHOT_SEED_STRIDE · K`` (draws differ between seeds).
KSHOT_SEED_STRIDE = 1000


def kshot_draw_seed(draw: int, seed_offset: int) -> int:
    return int(draw) + KSHOT_SEED_STRIDE * int(seed_offset)


def kshot_subset(labels: np.ndarray, train_rows: np.ndarray, task_index: int, k: int, seed: int) -> tuple[np.ndarray | None, str | None]:
    """k positives and k negatives of task ``task_index`` drawn from the labelled training rows.

    Returns ``(rows, None)``, or ``(None, reason)`` when fewer than k positives or negatives exist — the caller
    records the reason; nothing is skipped silently. The draw depends only on (seed, task, k), so every init gets
    the same patients.
    """
    y = labels[train_rows, task_index]
    pos, neg = train_rows[y == 1], train_rows[y == 0]
    if len(pos) < k or len(neg) < k:
        return None, (f"only {len(pos)} positive(s) and {len(neg)} negative(s) labelled in the training split; "
                      f"k={k} needs {k} of each")
    rng = np.random.default_rng([seed, task_index, k])
    return np.sort(np.r_[rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]), None


# ------------------------------------------------------------------------------------------ encoders
@dataclass
class EncodedInit:
    """An init's frozen computations on the rows of interest: the trunk output (input of the paper's trainable
    part) and the full encoder's 128-d features (input of the linear probe)."""

    name: str
    encoder: ImageEncoder
    rows: np.ndarray
    trunk: torch.Tensor
    features: np.ndarray
    position: dict = field(default_factory=dict)

    def at(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self.position[int(r)] for r in rows], dtype=np.int64)


def refuse_unfinished(source: str, allow_unfinished: bool = False, log=print) -> bool:
    """Whether ``source`` is a pretraining run folder whose ``run.json`` does not say ``complete``; such a run is
    refused in one line unless ``allow_unfinished`` (then said in the log). Returns True for an accepted
    unfinished run."""
    p = Path(str(source))
    if not p.is_dir():
        return False
    info = RunFolder(p).info() or {}
    status = info.get("status", "missing")
    if status == "complete":
        return False
    if not allow_unfinished:
        raise XcardiaError(f"--init {source}: the pretraining run did not finish (run.json status: {status}); "
                           f"finish it with `pretrain --resume --out {source}`, or pass --allow-unfinished to "
                           f"evaluate its latest encoder (the results will say so)")
    log(f"[finetune] warning: {source} did not finish (status {status}); evaluating its latest encoder as asked")
    return True


def build_init(source: str, image_spec: ImageEncoderSpec, preprocess: PreprocessSpec, seed: int) -> ImageEncoder:
    """``scratch`` or ``scratch:K`` (random weights, seeded with ``seed + K``) or a pretrained encoder (run folder,
    encoder file), checked against this preprocessing."""
    if source == "scratch" or source.startswith("scratch:"):
        offset = source.partition(":")[2]
        if offset and not offset.isdigit():
            raise XcardiaError(f"--init {source!r}: write scratch or scratch:K with an integer seed offset K")
        torch.manual_seed(seed + int(offset or 0))
        return ImageEncoder(image_spec)
    encoder, meta = load_encoder(source)
    trained_on = meta.get("preprocess")
    if trained_on and (tuple(trained_on["shape"]) != tuple(preprocess.shape)
                       or float(trained_on["spacing_mm"]) != float(preprocess.spacing_mm)):
        raise XcardiaError(f"{source}: the encoder was pretrained on {tuple(trained_on['shape'])} voxels at "
                           f"{trained_on['spacing_mm']} mm, this evaluation prepares {tuple(preprocess.shape)} at "
                           f"{preprocess.spacing_mm} mm; use the profile it was trained with")
    return encoder


@torch.no_grad()
def encode(name: str, encoder: ImageEncoder, dataset: CohortDataset, batch_size: int = 64) -> EncodedInit:
    encoder.eval()
    trunks, features = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        t = encoder.trunk(batch["image"])
        trunks.append(t)
        features.append(encoder.top(t))
    rows = dataset.rows
    return EncodedInit(name, encoder, rows, torch.cat(trunks), torch.cat(features).numpy(),
                       {int(r): i for i, r in enumerate(rows)})


def _weights_digest(encoder: ImageEncoder) -> str:
    """sha256 of an encoder's architecture and every tensor of its state (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256(json.dumps(encoder.spec.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _volumes_digest(dataset: CohortDataset) -> str:
    """sha256 of the preprocessed volumes of ``dataset``, in its order (what :func:`encode` reads)."""
    import hashlib

    h = hashlib.sha256(np.asarray(dataset.rows, dtype=np.int64).tobytes())
    for i in range(len(dataset)):
        h.update(np.ascontiguousarray(dataset.image(i), dtype=np.float32).tobytes())
    return h.hexdigest()


def encode_cached(name: str, encoder: ImageEncoder, dataset: CohortDataset, cache_root: str | os.PathLike | None,
                  volumes_digest: str | None = None, log=print) -> EncodedInit:
    """:func:`encode`, stored under ``cache_root/encoded/`` and reused by any later evaluation (notebook 05 after
    04, a rerun) that feeds the same weights the same volumes: the key is the sha256 of the encoder's tensors and of
    the volumes, so a reused entry holds exactly what encoding would recompute on this machine. An unreadable or
    mismatching entry is recomputed, with a log line."""
    if cache_root is None:
        return encode(name, encoder, dataset)
    import hashlib

    volumes_digest = volumes_digest or _volumes_digest(dataset)
    key = hashlib.sha256(f"encode-v1|{torch.__version__}|{_weights_digest(encoder)}|{volumes_digest}".encode()).hexdigest()[:40]
    path = Path(cache_root) / "encoded" / key[:2] / f"{key}.pt"
    rows = np.asarray(dataset.rows, dtype=np.int64)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if np.array_equal(saved["rows"].numpy(), rows) and len(saved["trunk"]) == len(rows) == len(saved["features"]):
                encoder.eval()
                return EncodedInit(name, encoder, dataset.rows, saved["trunk"], saved["features"].numpy(),
                                   {int(r): i for i, r in enumerate(dataset.rows)})
            log(f"[finetune] {path}: does not match {name}'s rows; encoding again")
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, never trusted
            log(f"[finetune] {path}: unreadable ({type(exc).__name__}); encoding {name} again")
    encoded = encode(name, encoder, dataset)
    try:
        write_atomic(path, lambda tmp: torch.save({"rows": torch.as_tensor(rows), "trunk": encoded.trunk,
                                                   "features": torch.as_tensor(encoded.features)}, tmp), suffix=".pt")
    except OSError as exc:  # a full disk or a read-only cache costs the reuse, never the evaluation
        log(f"[finetune] could not keep {name}'s encoding in {path.parent} ({exc.strerror or exc}); continuing without")
    return encoded


class TopModel(nn.Module):
    """What the paper's fine-tuning trains: a copy of the last ResNet stage, the feature layer after it
    (re-initialised when ``reinit_feature``, as ``Finetuning.py:336-338``), and the task heads."""

    def __init__(self, encoder: ImageEncoder, n_tasks: int, reinit_feature: bool = True,
                 train_batchnorm: bool = True):
        super().__init__()
        self.layer4 = copy.deepcopy(encoder.backbone.layer4)
        self.pool = copy.deepcopy(encoder.backbone.avgpool)
        self.feature = (nn.Linear(encoder.feature.in_features, encoder.feature.out_features) if reinit_feature
                        else copy.deepcopy(encoder.feature))
        self.heads = nn.Linear(encoder.spec.feature_dim, n_tasks)
        self.train_batchnorm = train_batchnorm

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.heads(self.feature(self.pool(self.layer4(trunk)).flatten(1)))

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_batchnorm:
            for m in self.modules():  # frozen BatchNorm statistics
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class EarlyStopping:
    """Early stopping on a validation score (higher is better), the public rule (``Finetuning.py:592-616``): an
    epoch improves when its score exceeds the best by more than ``min_delta``; training stops after ``patience``
    epochs without improvement, but not before ``min_epochs`` epochs.

    A NaN score (no validation task has both classes) carries no information: it never counts as an improvement
    and never advances the patience; while no finite score has been seen, the latest state is kept, so a run
    without any usable validation score ends with its last epoch. (The public code scores such an epoch 0.0.)

    Args:
        patience: epochs without improvement before stopping.
        min_delta: the margin an improvement must exceed.
        min_epochs: no stop before this many epochs.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, min_epochs: int = 0):
        self.patience = patience
        self.min_delta = min_delta
        self.min_epochs = min_epochs
        self.best = -math.inf
        self.best_state = None
        self.best_epoch = None
        self.stale = 0
        self.epochs = 0
        self.seen_finite = False

    def step(self, score: float, state) -> bool:
        """Record this epoch's ``score``; ``state()`` returns the weights to keep if it is the best. Returns True
        when training should stop."""
        self.epochs += 1
        if math.isnan(score):
            if not self.seen_finite:
                self.best_state = copy.deepcopy(state())
            return False
        if score > self.best + self.min_delta:
            self.best, self.stale, self.seen_finite, self.best_epoch = score, 0, True, self.epochs
            self.best_state = copy.deepcopy(state())
            return False
        self.stale += 1
        return self.stale >= self.patience and self.epochs >= self.min_epochs


def _macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    values = [auroc(y[:, t], p[:, t]) for t in range(y.shape[1])]
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


@torch.no_grad()
def _predict_top(model: TopModel, trunk: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([torch.sigmoid(model(trunk[i:i + batch])) for i in range(0, len(trunk), batch)]).numpy()


def train_public_protocol(model: nn.Module, parameters, forward, y: torch.Tensor, spec: FinetuneSpec, seed: int,
                          validate=None, epochs: int | None = None) -> EarlyStopping:
    """The public fine-tuning loop (``Finetuning.py:422-616``) over ``len(y)`` training rows.

    ``forward(rows)`` returns the logits (B, T) of those training rows; ``validate()`` the validation macro AUROC
    (None: no early stopping, ``epochs`` fixed epochs). Micro-batches of ``spec.batch_size`` in a fresh random order
    each epoch; the loss is the masked BCE (sum over labelled entries / their count, a micro-batch without labels is
    skipped, :462-476, :565-566) with ``pos_weight`` from these rows (defect 7 fixed); gradients are accumulated over
    ``grad_accum_steps`` micro-batches counted across epochs (DeepSpeed's global micro-step), clipped to norm
    ``grad_clip``, then AdamW steps; OneCycleLR (cosine, ``max(lr, 1e-3)`` peak) is stepped every micro-batch over
    ``max_epochs`` epochs' worth of micro-batches. The best epoch's weights are loaded back into ``model``.

    Returns:
        The stopper (``best_epoch``, ``epochs``, ``best``) for the record.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in parameters if p.requires_grad]
    pos_weight = pos_weight_from_subset(y, spec.pos_weight_cap)
    optimizer, scheduler = public_optimizer(parameters, spec, len(y), epochs)
    stopper = EarlyStopping(spec.patience, spec.min_delta, spec.min_epochs)
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    for _epoch in range(epochs or spec.max_epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(order), spec.batch_size):
            take = order[i:i + spec.batch_size]
            target = y[take]
            if not (~torch.isnan(target)).any():
                continue
            loss = masked_bce_with_logits(forward(take), target, pos_weight)
            (loss / spec.grad_accum_steps).backward()
            micro += 1
            if micro % spec.grad_accum_steps == 0:
                torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if scheduler.last_epoch + 1 < scheduler.total_steps:
                with warnings.catch_warnings():  # stepped per micro-batch, before the first accumulated step, as :569
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
        if validate is None:
            continue
        if stopper.step(validate(), model.state_dict):
            break
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    return stopper


def train_top(init: EncodedInit, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray | None,
              spec: FinetuneSpec, seed: int, epochs: int | None = None) -> TopModel:
    """The paper's protocol on ``train_rows`` (:func:`train_public_protocol` on the cached frozen trunk): early
    stopping on validation macro AUROC when ``val_rows`` is given, else ``epochs`` fixed epochs."""
    torch.manual_seed(seed)
    model = TopModel(init.encoder, labels.shape[1], spec.reinit_feature, spec.train_batchnorm)
    trunk = init.trunk[torch.as_tensor(init.at(train_rows))]
    y = torch.as_tensor(labels[train_rows])
    validate = None
    if val_rows is not None:
        val_trunk = init.trunk[torch.as_tensor(init.at(val_rows))]
        validate = lambda: _macro_auroc(labels[val_rows], _predict_top(model, val_trunk))  # noqa: E731
    train_public_protocol(model, model.parameters(), lambda take: model(trunk[take]), y, spec, seed, validate, epochs)
    return model


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float) -> np.ndarray:
    """Probability of the positive class from an L2 logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = ~np.isnan(train_y)
    if len(np.unique(train_y[keep])) < 2:
        return np.full(len(test_x), np.nan)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
    model.fit(train_x[keep], train_y[keep].astype(int))
    return model.predict_proba(test_x)[:, 1]


class _ScratchNetwork(nn.Module):
    """The public scratch model: a randomly initialised encoder and the ten heads, every layer trained."""

    def __init__(self, image_spec: ImageEncoderSpec, n_tasks: int):
        super().__init__()
        self.encoder = ImageEncoder(image_spec)
        self.heads = nn.Linear(image_spec.feature_dim, n_tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.encoder(x))


def _stack_images(dataset: CohortDataset, positions) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in positions])


def train_scratch_all(manifest, dataset_train: CohortDataset, dataset_val: CohortDataset, dataset_test: CohortDataset,
                      image_spec: ImageEncoderSpec, labels: np.ndarray, spec: FinetuneSpec, seed: int) -> np.ndarray:
    """The public scratch baseline (``Finetuning.py:334-346``): every layer from random weights, trained with the
    public loop (:func:`train_public_protocol`, ≤ ``scratch_all_max_epochs``). Returns test probabilities (n_test, T)."""
    torch.manual_seed(seed)
    net = _ScratchNetwork(image_spec, labels.shape[1])
    y_train = torch.as_tensor(labels[dataset_train.rows])

    @torch.no_grad()
    def predict(ds):
        net.eval()
        out = [torch.sigmoid(net(b["image"])) for b in torch.utils.data.DataLoader(ds, batch_size=128)]
        return torch.cat(out).numpy()

    train_public_protocol(net, net.parameters(), lambda take: net(_stack_images(dataset_train, take)), y_train,
                          replace(spec, max_epochs=spec.scratch_all_max_epochs), seed,
                          lambda: _macro_auroc(labels[dataset_val.rows], predict(dataset_val)))
    return predict(dataset_test)


# ------------------------------------------------------------------------------------------ experiments
@dataclass
class Experiment:
    """Everything an evaluation run shares: manifest, splits, labels, preprocessed data and encoded inits."""

    manifest: pd.DataFrame
    image_spec: ImageEncoderSpec
    preprocess: PreprocessSpec
    cache: PreprocessCache
    spec: FinetuneSpec
    labels: np.ndarray = None
    rows: dict = None
    datasets: dict = None
    inits: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    _volumes_digest: str | None = None

    def __post_init__(self):
        split = self.manifest["split"].astype(str)
        self.rows = {s: np.flatnonzero((split == s).to_numpy()) for s in ("train", "val", "test")}
        if len(self.rows["test"]) == 0:
            raise XcardiaError("the manifest has no test patients; evaluation needs a test split")
        if len(self.rows["val"]) == 0:
            raise XcardiaError("the manifest has no val patients; the paper protocol stops early on validation macro "
                               "AUROC (Finetuning.py:590-616): give some patients split 'val'")
        self.labels = table_array(self.manifest, LABELS)
        self.datasets = {s: CohortDataset(self.manifest, r, self.cache, None, None, 0, in_memory=True)
                         for s, r in self.rows.items()}

    def add_init(self, name: str, encoder: ImageEncoder, log=print) -> EncodedInit:
        """Encode ``name`` on train + val + test (reusing the encoding cache under the preprocessing cache's
        folder when it holds these weights on these volumes)."""
        union = CohortDataset.from_parts([self.datasets[s] for s in ("train", "val", "test")])  # volumes in RAM
        if self._volumes_digest is None:
            self._volumes_digest = _volumes_digest(union)
        self.inits[name] = encode_cached(name, encoder, union, self.cache.root if self.cache is not None else None,
                                         self._volumes_digest, log)
        return self.inits[name]

    def test_labels(self) -> np.ndarray:
        return self.labels[self.rows["test"]]


def _record(protocol, init, setting, value, seed, task_index, y_test, p, n_train_pos, n_train_neg, skipped=None) -> dict:
    task = LABELS[task_index]
    y = y_test[:, task_index]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    reason = skipped or ("no positive in the training subset" if not n_train_pos else
                         "no negative in the training subset" if not n_train_neg else
                         None if n_pos and n_neg else "no positives in test" if not n_pos else "no negatives in test")
    if not (n_train_pos and n_train_neg):  # a head that never saw a class is not scored, nor counted in a macro
        p = None
    return {"protocol": protocol, "init": init, "setting": setting, "value": value, "seed": seed, "task": task,
            "auroc": auroc(y, p) if p is not None else math.nan, "auprc": auprc(y, p) if p is not None else math.nan,
            "n_pos": n_pos, "n_neg": n_neg, "n_train_pos": n_train_pos, "n_train_neg": n_train_neg,
            "skipped": reason}


def run_fraction_sweep(exp: Experiment, log=print, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """The paper's sweep: every init × fraction × seed with the ``paper`` protocol and the linear probe, plus the
    ``scratch_all`` baseline on its fractions. Returns the per-task records and test predictions keyed by
    ``(protocol, init, fraction, seed)``."""
    from xcardia.progress import bar as tqdm

    spec, y_test, records, predictions = exp.spec, exp.test_labels(), [], {}
    train, val, test = labelled_rows(exp.labels, exp.rows["train"]), exp.rows["val"], exp.rows["test"]
    jobs = [(f, s) for f in spec.fractions for s in spec.fraction_seeds]
    for name, init in exp.inits.items():
        started = time.perf_counter()
        for fraction, seed in tqdm(jobs, desc=f"fine-tuning {name}", disable=not progress):
            subset = fraction_subset(train, fraction, seed)
            counts = [(int((exp.labels[subset, t] == 1).sum()), int((exp.labels[subset, t] == 0).sum())) for t in range(len(LABELS))]
            model = train_top(init, exp.labels, subset, val, spec, seed)
            p_paper = _predict_top(model, init.trunk[torch.as_tensor(init.at(test))])
            p_probe = np.stack([linear_probe(init.features[init.at(subset)], exp.labels[subset, t],
                                             init.features[init.at(test)], spec.probe_c) for t in range(len(LABELS))], 1)
            untrainable = [t for t, (pos, neg) in enumerate(counts) if not (pos and neg)]
            p_paper[:, untrainable] = np.nan  # issue 22: such tasks are skipped with their reason, never scored
            for protocol, p in (("paper", p_paper), ("probe", p_probe)):
                predictions[(protocol, name, fraction, seed)] = p
                for t in range(len(LABELS)):
                    records.append(_record(protocol, name, "fraction", fraction, seed, t, y_test, p[:, t], *counts[t]))
        exp.timing.setdefault("per_init_s", {})[name] = round(time.perf_counter() - started, 2)
        log(f"[finetune] {name}: {len(jobs)} fraction runs done")
    from xcardia.reporting import group_of

    scratch_names = [n for n in exp.inits if group_of(n) == "scratch"]
    if scratch_names:  # the paper's scratch policy, once (it retrains the whole network: the costliest protocol)
        started = time.perf_counter()
        for fraction in spec.scratch_all_fractions:
            for seed in spec.scratch_all_seeds:
                subset = fraction_subset(train, fraction, seed)
                ds_train = CohortDataset.from_parts([exp.datasets["train"]], subset)
                p = train_scratch_all(exp.manifest, ds_train, exp.datasets["val"], exp.datasets["test"], exp.image_spec,
                                      exp.labels, spec, seed)
                for t in range(len(LABELS)):
                    counts = (int((exp.labels[subset, t] == 1).sum()), int((exp.labels[subset, t] == 0).sum()))
                    if not all(counts):
                        p[:, t] = np.nan
                    records.append(_record("scratch_all", scratch_names[0], "fraction", fraction, seed, t, y_test, p[:, t], *counts))
                predictions[("scratch_all", scratch_names[0], fraction, seed)] = p
        exp.timing["scratch_all_s"] = round(time.perf_counter() - started, 2)
        log("[finetune] scratch with every layer trainable: done")
    return pd.DataFrame(records), predictions


def run_kshot(exp: Experiment, log=print, progress: bool = False) -> tuple[pd.DataFrame, dict, dict]:
    """True k-shot: per task, k positives + k negatives from the training split, ``kshot_seeds`` draws per
    pretraining seed (draw d of seed K uses :func:`kshot_draw_seed`), the same subsets for every init of a seed.
    Returns records, test predictions keyed by ``(protocol, init, k, draw, task)``, and the sampled patient ids
    ``{"sK": {task: {k: {draw: [ids]}}}}``."""
    from xcardia.progress import bar as tqdm

    from xcardia.reporting import seed_of

    spec, y_test, records, predictions = exp.spec, exp.test_labels(), [], {}
    train, test = exp.rows["train"], exp.rows["test"]
    ids = exp.manifest["patient_id"].to_numpy()
    subsets: dict = {}
    draws: dict = {}  # seed offset → {(task, k, draw): (rows, reason)}
    for offset in sorted({seed_of(name) for name in exp.inits} or {0}):
        for t, task in enumerate(LABELS):
            for k in spec.ks:
                for draw in range(spec.kshot_seeds):
                    rows, reason = kshot_subset(exp.labels, train, t, k, kshot_draw_seed(draw, offset))
                    draws.setdefault(offset, {})[(t, k, draw)] = (rows, reason)
                    subsets.setdefault(f"s{offset}", {}).setdefault(task, {}).setdefault(str(k), {})[str(draw)] = (
                        [str(i) for i in ids[rows]] if rows is not None else {"skipped": reason})
    for name, init in exp.inits.items():
        started = time.perf_counter()
        grouped = _kshot_paper_grouped(init, exp, draws[seed_of(name)], test) if spec.batched_kshot else {}
        for (t, k, seed), (rows, reason) in tqdm(draws[seed_of(name)].items(), desc=f"k-shot {name}",
                                                 disable=not progress):
            for protocol in spec.kshot_protocols:
                if protocol == "paper" and k not in spec.kshot_paper_ks:
                    continue
                if rows is None:
                    records.append(_record(protocol, name, "kshot", k, seed, t, y_test, None, 0, 0, skipped=reason))
                    continue
                if protocol == "probe":
                    p = linear_probe(init.features[init.at(rows)], exp.labels[rows, t], init.features[init.at(test)], spec.probe_c)
                elif (t, k, seed) in grouped:
                    p = grouped[(t, k, seed)]
                else:
                    model = train_top(init, exp.labels[:, [t]], rows, None, spec, seed, epochs=spec.kshot_epochs)
                    p = _predict_top(model, init.trunk[torch.as_tensor(init.at(test))])[:, 0]
                predictions[(protocol, name, k, seed, t)] = p
                records.append(_record(protocol, name, "kshot", k, seed, t, y_test, p, k, k))
        exp.timing.setdefault("per_init_s", {})[name] = round(time.perf_counter() - started, 2)
        log(f"[fewshot] {name}: done")
    return pd.DataFrame(records), predictions, subsets


def _kshot_paper_grouped(init: EncodedInit, exp: "Experiment", draws: dict, test: np.ndarray) -> dict:
    """Test predictions of every k-shot ``paper`` run of ``init``, trained ``kshot_group_size`` at a time as grouped
    models (:func:`xcardia.batched.train_kshot_grouped`): each member built and ordered exactly as
    :func:`train_top` would, so the predictions equal the one-at-a-time path's to float tolerance."""
    from xcardia.batched import predict_grouped, train_kshot_grouped

    spec = exp.spec
    jobs = [(key, rows) for key, (rows, _) in draws.items()
            if rows is not None and "paper" in spec.kshot_protocols and key[1] in spec.kshot_paper_ks]
    out: dict = {}
    test_trunk = init.trunk[torch.as_tensor(init.at(test))]
    for k in sorted({key[1] for key, _ in jobs}):
        same_k = [(key, rows) for key, rows in jobs if key[1] == k]
        for start in range(0, len(same_k), spec.kshot_group_size):
            group = same_k[start:start + spec.kshot_group_size]
            members = []
            for (t, _k, seed), _rows in group:
                torch.manual_seed(seed)  # as train_top builds its model
                members.append(TopModel(init.encoder, 1, spec.reinit_feature, spec.train_batchnorm))
            model = train_kshot_grouped(members, init.trunk, [init.at(rows) for _, rows in group],
                                        [exp.labels[rows][:, [t]] for (t, _k, _s), rows in group],
                                        [seed for (_t, _k, seed), _ in group], spec, spec.kshot_epochs)
            probabilities = predict_grouped(model, test_trunk)[:, :, 0]
            for m, (key, _rows) in enumerate(group):
                out[key] = probabilities[:, m]
    return out


def prepare_experiment(profile, manifest, inits: dict[str, str], cache_dir, spec: FinetuneSpec | None = None,
                       seed: int = 0, log=print, allow_unfinished: bool = False) -> Experiment:
    """Load the data once and encode every init (``name → "scratch" | run folder | encoder file``). A run that did
    not finish is refused unless ``allow_unfinished``."""
    spec = spec or FinetuneSpec()
    for source in inits.values():
        refuse_unfinished(str(source), allow_unfinished, lambda *_: None)
    encoders = {name: build_init(str(source), profile.model.image, profile.preprocess, seed)  # refuse bad inits first
                for name, source in inits.items()}
    exp = Experiment(manifest, profile.model.image, profile.preprocess, PreprocessCache(cache_dir, profile.preprocess), spec)
    for s in ("train", "val", "test"):
        exp.datasets[s].warm()
    for name, encoder in encoders.items():
        started = time.perf_counter()
        exp.add_init(name, encoder, log)
        exp.timing.setdefault("encode_s", {})[name] = round(time.perf_counter() - started, 2)
        log(f"[finetune] encoded {name}")
    return exp


def save_predictions(path: str | os.PathLike, predictions: dict) -> None:
    arrays = {"|".join(map(str, key)): value for key, value in predictions.items()}
    write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")


def load_predictions(path: str | os.PathLike) -> dict:
    def parse(part: str):
        for cast in (int, float):
            try:
                return cast(part)
            except ValueError:
                pass
        return part

    with np.load(path) as data:
        return {tuple(parse(p) for p in key.split("|")): data[key] for key in data.files}


# ------------------------------------------------------------------------------------------ runs with files
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
