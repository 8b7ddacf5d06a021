"""Pretraining engine: align CT with ECHO/ECG phenotypes (CLIP + λ_nw·NW), on a CPU, one GPU or many.

    python -m xcardia pretrain --method xcardia --data outputs/cpu/cohort --profile cpu --out runs/xcardia
    torchrun --nproc_per_node 8 -m xcardia pretrain --method xcardia --data DATA --profile paper --out RUN

Methods: ``clip`` (λ_nw = 0), ``xcardia`` (CLIP + λ_nw·NW), ``nw_only`` (NW alone). Variants: ``paper`` reproduces
the public code's settings (NW τ = 1 fixed, KNN imputation, fused query); ``fixed`` (default) learns the NW τ
(from 0.1) and uses missing-value tokens. Whatever the variant, the defects of the public code stay fixed:
unreadable CTs are errors, missing concepts are masked, negatives and the support bank are global under DDP.

The run folder (:class:`xcardia.run_folder.RunFolder`) holds the checkpoint to resume from (written atomically every
epoch), the selected epoch whole and its image encoder (best validation concept mAP, as the paper selects), the
per-epoch log and ``run.json``. Only ``pretrain`` and ``train`` patients take gradient steps; ``val`` selects the
model; ``test`` is never read.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from xcardia import __version__
from xcardia.schema import CONCEPT_NAMES
from xcardia.data.dataset import AugmentSpec, CohortDataset
from xcardia.data.imaging import PreprocessCache, PreprocessSpec
from xcardia.data.manifest import load_manifest
from xcardia.distributed import (
    all_reduce_mean,
    barrier,
    gather_no_grad,
    init_from_environment,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)
from xcardia.errors import XcardiaError
from xcardia.losses import clip_loss, nw_predict, pretraining_loss
from xcardia.metrics import concept_metrics
from xcardia.models.tabular_encoder import DEFAULT_TABULAR_COLUMNS, TabularPreprocessor, scarf_corrupt
from xcardia.models.weights import save_encoder
from xcardia.models.xcardia_model import ModelSpec, XCardiaModel
from xcardia.precision import Precision, plan
from xcardia.atomic import to_jsonable
from xcardia.run_folder import RunFolder, cohort_fingerprint, describe_cohort_change
from xcardia.support_bank import QueueBank, SupportBank, build_kmeans_bank, step_support

from xcardia.specs import METHODS, VARIANTS, PretrainSpec  # noqa: F401 - the engine's spec, re-exported

TRAINING_SPLITS = ("pretrain", "train")


def apply_variant(model: ModelSpec, spec: PretrainSpec) -> tuple[ModelSpec, PretrainSpec]:
    """Settings that distinguish the ``paper`` variant from the ``fixed`` one."""
    if spec.variant == "paper":  # the public code's settings, accidents included (docs/method.md §6)
        return (replace(model, nw_temperature=1.0, learnable_nw_temperature=False, clip_temperature=0.07,
                        learnable_clip_temperature=False, tabular_init="xavier"),
                replace(spec, tabular_missing="knn", kmeans_n_init="auto", scheduler_epoch_lag=True))
    return (replace(model, nw_temperature=0.1, learnable_nw_temperature=True),
            replace(spec, tabular_missing="token"))


def effective_model_spec(model: ModelSpec, spec: PretrainSpec) -> ModelSpec:
    """A temperature the method never uses is not learned (so every learned parameter gets a gradient, as DDP
    without unused-parameter search requires)."""
    if spec.nw_weight == 0:
        model = replace(model, learnable_nw_temperature=False)
    if spec.clip_weight == 0:
        model = replace(model, learnable_clip_temperature=False)
    return model


def run_config(model: ModelSpec, spec: PretrainSpec, preprocess: PreprocessSpec, manifest_path: str,
               tabular_columns) -> dict:
    return {"model": model.to_dict(), "pretrain": asdict(spec), "preprocess": preprocess.key(),
            "tabular_columns": list(tabular_columns), "data": str(manifest_path)}


#: Runtime switches: they may differ between a run and its resumption (they do not change the result).
RESUMABLE_DIFFERENCES = ("epochs", "num_workers", "compile", "activation_checkpointing")


def _comparable(config: dict) -> dict:
    c = json.loads(json.dumps(config))
    for key in RESUMABLE_DIFFERENCES:
        c["pretrain"].pop(key, None)
    return c


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} → {vb!r}")
    return out




def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.as_tensor(np_state[1].astype(np.int64)),
                                                        int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _Embedder:
    """Embeds a dataset with the current model (eval mode, no gradient), sharded across ranks."""

    def __init__(self, dataset: CohortDataset, batch_size: int, device, num_workers: int):
        sampler = DistributedSampler(dataset, shuffle=False) if is_distributed() else None
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                 num_workers=num_workers)
        self.device = device

    @torch.no_grad()
    def __call__(self, model: XCardiaModel, query: str, autocast) -> dict[str, torch.Tensor]:
        was_training = model.training
        model.eval()
        parts: dict[str, list] = {"query": [], "image": [], "tabular": [], "concepts": [], "index": []}
        for batch in self.loader:
            image = batch["image"].to(self.device, non_blocking=True)
            with autocast():
                e_img, e_tab = model(image, batch["tab_values"].to(self.device), batch["tab_missing"].to(self.device))
            e_img, e_tab = e_img.float(), e_tab.float()
            parts["query"].append(XCardiaModel.nw_query(e_img, e_tab, query))
            parts["image"].append(e_img)
            parts["tabular"].append(e_tab)
            parts["concepts"].append(batch["concepts"].to(self.device))
            parts["index"].append(batch["index"].to(self.device))
        model.train(was_training)
        return {k: torch.cat(v) for k, v in parts.items()}


def _prepare_run_dir(folder: RunFolder, config: dict, resume: bool, fingerprint: dict | None = None) -> dict | None:
    """Checks on the run folder; returns the checkpoint to resume from (or None), raises on conflicts."""
    checkpoint, out = folder.checkpoint, folder.path
    if resume:
        state = folder.resume_state()
        changed = describe_cohort_change(state.get("cohort"), fingerprint) if fingerprint else None
        if changed:
            raise XcardiaError(f"--resume: the cohort changed since {checkpoint} was written ({changed}); "
                               f"start a new run in another --out")
        diff = _config_differences(_comparable(state["config"]), _comparable(config))
        if diff:
            raise XcardiaError(f"--resume: {checkpoint} was written with a different configuration "
                               f"({'; '.join(diff[:5])}); resume with the original settings or use another --out")
        finished = (folder.info() or {}).get("status") == "complete"
        if int(state["epoch"]) >= int(config["pretrain"]["epochs"]) and finished:
            raise XcardiaError(f"--resume: {out} already finished {state['epoch']} of {config['pretrain']['epochs']} "
                               f"epochs; pass a larger --epochs to continue it")
        return state
    if folder.holds_a_run():
        raise XcardiaError(f"{out} already holds a pretraining run; pass --resume to continue it or choose another --out")
    return None


def finished_run(out: str | os.PathLike, config: dict, fingerprint: dict | None = None) -> bool:
    """True when ``out`` holds a complete run of exactly this configuration (notebooks reuse it).

    Raises:
        XcardiaError: the run is complete but the cohort changed since (reusing it would be silently wrong).
    """
    info = RunFolder(out).info()
    if info is None:
        return False
    same = info.get("status") == "complete" and info.get("config") == json.loads(json.dumps(config))
    changed = describe_cohort_change(info.get("cohort"), fingerprint) if (same and fingerprint) else None
    if changed:
        raise XcardiaError(f"{out} holds a finished run on a different version of this cohort ({changed}); "
                           f"delete that folder or choose another output folder")
    return same


def pretrain(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, model_spec: ModelSpec, spec: PretrainSpec,
             preprocess: PreprocessSpec, cache_dir: str | os.PathLike | None = None, resume: bool = False,
             tabular_columns=DEFAULT_TABULAR_COLUMNS, progress: bool = True, on_step=None, log=print) -> Path:
    """Pretrain one encoder and return its run folder.

    Args:
        manifest_path: manifest or cohort folder.
        out_dir: the run folder (new, or an interrupted run with ``resume``).
        model_spec: architecture (``apply_variant`` already applied).
        spec: hyper-parameters.
        preprocess: CT preprocessing (shape, spacing, window).
        cache_dir: preprocessed-CT cache (default: ``<out_dir>/../cache``).
        resume: continue from ``out_dir/checkpoint.pt`` (same configuration, possibly more epochs).
        tabular_columns: manifest columns of the tabular encoder.
        progress: a tqdm bar per epoch (rank 0).
        on_step: optional ``callback(epoch, step)`` after each optimiser step.
        log: where rank 0's progress lines go.

    Raises:
        XcardiaError: bad data, a conflicting run folder, or a resume with a different configuration.
    """
    folder = RunFolder(out_dir)
    device = init_from_environment()
    lock = folder.lock().acquire() if is_main_process() else None
    try:
        return _pretrain(folder, device, manifest_path, model_spec, spec, preprocess, cache_dir, resume, tabular_columns,
                         progress, on_step, log)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """Everything one pretraining run holds while it trains (built by :func:`_setup`)."""

    folder: RunFolder
    spec: PretrainSpec
    model_spec: ModelSpec
    preprocess: PreprocessSpec
    config: dict
    fingerprint: dict
    device: torch.device
    model: XCardiaModel
    forward: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: Precision
    pre: TabularPreprocessor
    train_rows: np.ndarray
    train_ds: CohortDataset
    plain_ds: CohortDataset
    val_ds: CohortDataset
    sampler: DistributedSampler
    loader: DataLoader
    embed_train: _Embedder
    embed_val: _Embedder
    queue: QueueBank | None = None
    bank: SupportBank | None = None
    history: list = None
    best: dict = None
    start_epoch: int = 0
    step_count: int = 0
    started: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def rebuild_kmeans_bank(self) -> SupportBank:
        embedded = self.embed_train(self.model, self.spec.nw_query, self.precision.autocast)
        return build_kmeans_bank(embedded["query"], embedded["concepts"], embedded["index"],
                                 self.spec.bank_k_per_concept, self.spec.seed, self.spec.kmeans_n_init)

    def support_bank(self) -> SupportBank | None:
        """The support the NW head validates against (the queue's filled part, or the k-means bank)."""
        return self.queue.bank() if self.queue is not None else self.bank


def _pretrain(folder: RunFolder, device, manifest_path, model_spec: ModelSpec, spec: PretrainSpec, preprocess: PreprocessSpec,
              cache_dir, resume: bool, tabular_columns, progress: bool, on_step, log) -> Path:
    main = is_main_process()
    say = log if main else (lambda *_: None)
    run = _setup(folder, device, manifest_path, model_spec, spec, preprocess, cache_dir, resume, tabular_columns,
                 progress, say)
    for epoch in range(run.start_epoch, spec.epochs):
        sums, n_batches, wait, seconds = train_one_epoch(run, epoch, progress and main, on_step)
        if spec.bank in ("kmeans", "batch") and (epoch + 1) % spec.bank_refresh_every == 0:
            run.bank = run.rebuild_kmeans_bank()
        row = {"epoch": epoch + 1, "step": run.step_count, "lr": run.optimizer.param_groups[0]["lr"],
               **{f"train_{k}": all_reduce_mean(torch.tensor(v / max(n_batches, 1))).item() for k, v in sums.items()},
               "clip_temperature": run.model.clip_temperature().item(),
               "nw_temperature": run.model.nw_temperature().item()}
        row.update(evaluate(run))
        support = run.support_bank()
        row["bank_size"] = len(support) if support is not None else 0
        row["epoch_seconds"] = time.perf_counter() - seconds
        row["data_wait_share"] = wait / max(row["epoch_seconds"], 1e-9)
        run.history.append(to_jsonable(row))
        improved = select_epoch(run.best, row)
        if main:
            say(f"[pretrain] {spec.method} epoch {epoch + 1}/{spec.epochs}: loss {row['train_loss']:.4f} "
                f"val concept AUROC {row.get('val_concept_auroc', math.nan):.3f} "
                f"mAP {row.get('val_concept_map', math.nan):.3f} ({row['epoch_seconds']:.0f} s)")
            save_epoch(run, epoch, improved)
        barrier()
    if main:
        folder.write_run_json(_run_json(run, "complete"))
        say(f"[pretrain] {spec.method}: best epoch {run.best['epoch']} (val concept mAP {run.best['concept_map']:.3f}); "
            f"encoder: {folder.encoder}")
    barrier()
    return folder.path


def _setup(folder: RunFolder, device, manifest_path, model_spec: ModelSpec, spec: PretrainSpec, preprocess: PreprocessSpec,
           cache_dir, resume: bool, tabular_columns, progress: bool, say) -> _Run:
    """Data, model, optimiser and (on ``resume``) the state of the last complete epoch, in the order that keeps
    every random draw where a straight run makes it."""
    model_spec = effective_model_spec(model_spec, spec)
    manifest = load_manifest(manifest_path)
    config = run_config(model_spec, spec, preprocess, manifest.attrs["path"], tabular_columns)
    fingerprint = cohort_fingerprint(manifest)
    resumed = _prepare_run_dir(folder, config, resume, fingerprint)
    barrier()
    out = folder.path
    out.mkdir(parents=True, exist_ok=True)
    main = is_main_process()
    _seed_everything(spec.seed)
    cuda = device.type == "cuda"

    split = manifest["split"].astype(str)
    train_rows = np.flatnonzero(split.isin(TRAINING_SPLITS).to_numpy())
    val_rows = np.flatnonzero((split == "val").to_numpy())
    if len(val_rows) == 0:
        raise XcardiaError("the manifest has no val patients: the paper's rule selects the pretraining epoch on "
                           "validation concept mAP (Pretraining.py:585-591); give some patients split 'val'")
    if len(train_rows) < spec.batch_size * world_size():
        raise XcardiaError(f"{len(train_rows)} pretrain/train patients is fewer than one global batch "
                           f"({spec.batch_size} × {world_size()}); lower --batch-size or add patients")
    pre = (TabularPreprocessor.from_state_dict(resumed["tabular"]) if resumed else
           TabularPreprocessor(tuple(tabular_columns), spec.tabular_missing).fit(
               manifest.iloc[np.flatnonzero((split == "pretrain").to_numpy()) if (split == "pretrain").any() else train_rows]))
    tabular = pre.transform(manifest)
    cache = PreprocessCache(Path(cache_dir) if cache_dir else out.parent / "cache", preprocess)
    augment = AugmentSpec() if spec.augment else None
    train_ds = CohortDataset(manifest, train_rows, cache, tabular, augment, spec.seed, spec.in_memory)
    plain_ds = train_ds.view(augment=None)  # the same volumes in RAM, never loaded twice
    val_ds = CohortDataset(manifest, val_rows, cache, tabular, None, spec.seed, spec.in_memory)
    shard = lambda n: range(rank(), n, world_size())  # noqa: E731 - each rank prepares its share of the cache
    train_ds.warm(shard(len(train_ds)) if not spec.in_memory else None, progress and main, "preprocessing training CTs")
    val_ds.warm(shard(len(val_ds)) if not spec.in_memory else None, progress and main, "preprocessing validation CTs")
    barrier()

    precision = plan(device, spec.bf16, spec.channels_last)
    if main and progress:
        say(f"[pretrain] precision: {precision.description}")
    model = precision.model(XCardiaModel(model_spec, len(pre.columns)).to(device))
    model.image_encoder.checkpoint_stages = bool(cuda and spec.activation_checkpointing)
    if spec.clip_weight == 0 and spec.nw_query == "image":  # nothing reaches the tabular tower: keep it frozen
        for module in (model.tabular_encoder, model.tabular_projection):
            module.requires_grad_(False)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) \
        if is_distributed() else model
    forward = torch.compile(net) if (cuda and spec.compile) else net
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                                  weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=spec.restart_period,
                                                                     T_mult=spec.restart_mult, eta_min=spec.min_lr)
    sampler = DistributedSampler(train_ds, num_replicas=world_size(), rank=rank(), shuffle=True, seed=spec.seed,
                                 drop_last=True)
    loader = DataLoader(train_ds, batch_size=spec.batch_size, sampler=sampler, num_workers=spec.num_workers,
                        drop_last=True, pin_memory=cuda, persistent_workers=False,
                        generator=torch.Generator().manual_seed(spec.seed))
    run = _Run(folder=folder, spec=spec, model_spec=model_spec, preprocess=preprocess, config=config,
               fingerprint=fingerprint, device=device, model=model, forward=forward, optimizer=optimizer,
               scheduler=scheduler, precision=precision, pre=pre, train_rows=train_rows, train_ds=train_ds,
               plain_ds=plain_ds, val_ds=val_ds, sampler=sampler, loader=loader,
               embed_train=_Embedder(plain_ds, max(spec.batch_size, 16), device, spec.num_workers),
               embed_val=_Embedder(val_ds, max(spec.batch_size, 16), device, spec.num_workers),
               queue=QueueBank(spec.queue_size, model_spec.proj_dim, len(CONCEPT_NAMES), device)
               if spec.bank == "queue" else None,
               history=[], best={"epoch": None, "concept_map": -math.inf})
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        run.bank = SupportBank.from_state_dict(resumed["bank"], device) if resumed.get("bank") else None
        if run.queue is not None:
            run.queue.load_state_dict(resumed["queue"])
        run.history, run.best = resumed["history"], resumed["best"]
        run.start_epoch, run.step_count = int(resumed["epoch"]), int(resumed["step"])
        _set_rng_state(resumed["rng"])
        say(f"[pretrain] resuming {out} at epoch {run.start_epoch + 1}/{spec.epochs}")
    if run.bank is None and spec.bank in ("kmeans", "batch"):
        run.bank = run.rebuild_kmeans_bank()  # the paper builds its bank before the first epoch
    run.started = time.perf_counter() - (float(resumed.get("wall_time_s", 0.0)) if resumed else 0.0)
    if resumed and is_main_process():
        rng = _rng_state()
        _reconcile(run, say)
        _set_rng_state(rng)  # writing files draws nothing, but keep the resumed stream exact regardless
    return run


def train_one_epoch(run: _Run, epoch: int, progress: bool, on_step=None) -> tuple[dict, int, float, float]:
    """One pass over the training patients: the objective of :func:`xcardia.losses.pretraining_loss` on every
    batch, the bank chosen per step by :func:`xcardia.support_bank.step_support`. Returns the summed losses, the
    number of batches, the seconds spent waiting for data and the epoch's start time."""
    from xcardia.progress import bar as tqdm

    spec, model, device = run.spec, run.model, run.device
    model.train()
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    support_for = step_support(spec.bank, run.bank, run.queue)
    sums = {"loss": 0.0, "clip": 0.0, "nw": 0.0}
    n_batches, wait, t_epoch = 0, 0.0, time.perf_counter()
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{spec.epochs}", disable=not progress, leave=False)
    t_ready = time.perf_counter()
    for step, batch in enumerate(bar):
        wait += time.perf_counter() - t_ready
        image = batch["image"].to(device, non_blocking=True)
        image = run.precision.batch(image)
        values, missing = batch["tab_values"].to(device), batch["tab_missing"].to(device)
        concepts = batch["concepts"].to(device)
        if spec.scarf_rate > 0:
            g = torch.Generator(device=values.device).manual_seed(spec.seed * 1_000_003 + run.step_count)
            values, missing = scarf_corrupt(values, missing, spec.scarf_rate, g)
        with run.precision.autocast():
            e_img, e_tab = run.forward(image, values, missing)
        loss, parts = pretraining_loss(e_img.float(), e_tab.float(), concepts, model.clip_temperature(),
                                       model.nw_temperature(), spec.clip_weight, spec.nw_weight, spec.nw_query,
                                       support_for, spec.nw_kernel)
        for key in ("clip", "nw"):
            if key in parts:
                sums[key] += parts[key].item()
        if run.queue is not None and "query" in parts:
            run.queue.enqueue(parts["query"].detach(), concepts, batch["index"].to(device))
        value = loss.item()
        if not math.isfinite(value):  # stop before the step writes NaN into the weights; the checkpoint stays
            raise XcardiaError(
                f"the training loss is {value} at epoch {epoch + 1}, step {step + 1} ({run.precision.description}): "
                "training diverged. "
                + (f"The checkpoint of the last complete epoch in {run.folder.path} is untouched; "
                   if run.folder.checkpoint.exists() else "No epoch had completed, so nothing was saved; ")
                + ("train in fp32 (--no-bf16), or " if run.precision.bf16 else "") + "lower --lr and start again")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        sums["loss"] += value
        n_batches += 1
        run.step_count += 1
        if on_step is not None:
            on_step(epoch, step)
        t_ready = time.perf_counter()
    bar.close()
    if spec.scheduler_epoch_lag:  # the public sched.step(epoch) (Pretraining.py:555): the next epoch reuses this rate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PyTorch deprecates the epoch argument
            run.scheduler.step(epoch)
    else:
        run.scheduler.step()
    return sums, n_batches, wait, t_epoch


@torch.no_grad()
def evaluate(run: _Run) -> dict:
    """Validation of the current model: NW concept predictions of the validation patients from the current support
    (AUROC, mAP, ECE per concept and mean), the same with the image-only query against the bank's patients
    represented by their CT alone, and the CLIP loss on validation batches. Empty without validation patients."""
    spec, model, device = run.spec, run.model, run.device
    if not len(run.val_ds):
        return {}
    val = run.embed_val(model, spec.nw_query, run.precision.autocast)
    support_bank = run.support_bank()
    order = gather_no_grad(val["index"]).cpu().numpy()  # a padded sampler repeats some patients: drop them
    keep = torch.as_tensor(np.unique(order, return_index=True)[1], device=device)
    q_all = gather_no_grad(val["query"])[keep]
    c_all = gather_no_grad(val["concepts"])[keep]
    pred, _ = nw_predict(q_all, support_bank.embeddings, support_bank.targets, model.nw_temperature(), spec.nw_kernel)
    img_all, tab_all = gather_no_grad(val["image"])[keep], gather_no_grad(val["tabular"])[keep]
    n = img_all.shape[0] // spec.batch_size * spec.batch_size
    val_clip = [float(clip_loss(img_all[i:i + spec.batch_size], tab_all[i:i + spec.batch_size],
                                model.clip_temperature())) for i in range(0, n, spec.batch_size)]
    row = {f"val_{k}": v for k, v in concept_metrics(pred.cpu().numpy(), c_all.cpu().numpy()).items()}
    row["val_clip"] = float(np.mean(val_clip)) if val_clip else math.nan
    # the same support patients represented by their CT alone: does the encoder carry the NW score?
    image_support = _image_embeddings_of(model, run.plain_ds, run.train_rows, support_bank, device,
                                         run.precision.autocast)
    if image_support is not None:
        pred_img, _ = nw_predict(torch.nn.functional.normalize(img_all, dim=-1), image_support[0], image_support[1],
                                 model.nw_temperature(), spec.nw_kernel)
        image_metrics = concept_metrics(pred_img.cpu().numpy(), c_all.cpu().numpy())
        row["val_image_query_concept_auroc"] = image_metrics["concept_auroc"]
        row["val_image_query_concept_map"] = image_metrics["concept_map"]
    return row


def select_epoch(best: dict, row: dict) -> bool:
    """The paper's selection rule, updated in place: the epoch with the best validation concept mAP (the first
    epoch is kept when no score is finite). Returns whether this epoch is the new selection."""
    score = row.get("val_concept_map", math.nan)
    improved = (best["epoch"] is None) or (not math.isnan(score) and score > best["concept_map"])
    if improved:
        best.update(epoch=row["epoch"], concept_map=score if not math.isnan(score) else -math.inf)
    return improved


def save_epoch(run: _Run, epoch: int, improved: bool) -> None:
    """Rank 0's files after an epoch, each written atomically, the checkpoint first: if the disk fills on the way,
    the checkpoint is the last complete epoch and ``--resume`` rewrites every later file from it
    (:func:`_reconcile`), so no file of the run folder is ahead of the checkpoint (issue 22). Then the selection
    whole (``selected.pt``) and its encoder (``encoder.pt``) when this epoch is selected, the last encoder, the logs
    and ``run.json``."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "epoch": epoch + 1, "step": run.step_count,
             "rng": _rng_state(), "bank": run.bank.state_dict() if run.bank is not None else None,
             "queue": run.queue.state_dict() if run.queue is not None else None, "tabular": run.pre.state_dict(),
             "history": run.history, "best": run.best, "config": run.config, "cohort": run.fingerprint,
             "wall_time_s": time.perf_counter() - run.started, "xcardia_version": __version__}
    run.folder.write_checkpoint(state)
    _write_epoch_files(run, epoch, improved)


def _write_epoch_files(run: _Run, epoch: int, improved: bool) -> None:
    spec, model, folder = run.spec, run.model, run.folder
    meta = {"method": spec.method, "variant": spec.variant, "epoch": epoch + 1,
            "val_concept_map": run.history[-1].get("val_concept_map"), "selection": "best validation concept mAP",
            "model": run.model_spec.to_dict(), "preprocess": run.preprocess.key(), "xcardia_version": __version__,
            "run": str(folder.path.resolve())}
    if improved:  # the whole selection, so every later analysis uses one epoch (issue 11.5)
        save_encoder(folder.encoder, model.image_encoder, meta)
        selected = {"model": model.state_dict(), "tabular": run.pre.state_dict(), "epoch": epoch + 1,
                    "bank": support_bank_state(run.bank, run.queue), "config": run.config,
                    "metrics": run.history[-1], "xcardia_version": __version__}
        folder.write_selected(selected)
    save_encoder(folder.encoder_last, model.image_encoder, {**meta, "selection": "last epoch"})
    folder.write_logs(run.history)
    folder.write_run_json(_run_json(run, "running"))


def _reconcile(run: _Run, say) -> None:
    """On ``--resume``: rewrite the files of the checkpoint's epoch (logs, last encoder, run.json, and the selection
    when the checkpoint's epoch is the selected one but ``selected.pt`` holds another) so that every file agrees with
    the checkpoint — a crash (a full disk) between the checkpoint and them left them behind."""
    epoch = run.start_epoch - 1
    selected_epoch = None
    try:
        selected_epoch = int(run.folder.load_state("selected")["epoch"]) if run.folder.selected.exists() else None
    except Exception:  # noqa: BLE001 - an unreadable selection is rewritten below when it should hold this epoch
        selected_epoch = None
    improved = run.best.get("epoch") == run.start_epoch and selected_epoch != run.start_epoch
    if improved:
        say(f"[pretrain] {run.folder.selected} was behind the checkpoint (epoch {selected_epoch} instead of "
            f"{run.start_epoch}); rewriting it from the checkpoint")
    _write_epoch_files(run, epoch, improved)


def support_bank_state(bank: SupportBank | None, queue: QueueBank | None) -> dict | None:
    """The support the NW head used at validation time (a queue's filled part only)."""
    if queue is not None:
        return queue.bank().state_dict()
    return bank.state_dict() if bank is not None else None


@torch.no_grad()
def _image_embeddings_of(model: XCardiaModel, dataset: CohortDataset, train_rows: np.ndarray, bank,
                         device, autocast, limit: int = 256) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Normalised image embeddings and targets of the bank's patients (at most ``limit``, most recent), for the
    image-only query diagnostic; None without a bank."""
    if bank is None or len(bank) == 0:
        return None
    rows = bank.indices.cpu().numpy()[-limit:]
    targets = bank.targets[-limit:]
    keep = rows >= 0
    positions = np.searchsorted(train_rows, rows[keep])
    was_training = model.training
    model.eval()
    images = torch.stack([dataset[int(i)]["image"] for i in positions]).to(device)
    with autocast():
        e_img = model.embed_image(images).float()
    model.train(was_training)
    return torch.nn.functional.normalize(e_img, dim=-1), targets[torch.as_tensor(keep, device=targets.device)]


def _run_json(run: _Run, status: str) -> dict:
    """What ``run.json`` records: configuration, cohort, status, the selection and the time spent so far."""
    return {"status": status, "config": run.config, "cohort": run.fingerprint,
            "selection": {"criterion": "best validation concept mAP",
                          "epoch": run.best["epoch"], "val_concept_map": run.best["concept_map"]},
            "epochs_done": len(run.history), "wall_time_s": round(time.perf_counter() - run.started, 1),
            "xcardia_version": __version__}


def read_log(run_dir: str | os.PathLike):
    """The per-epoch log of a run as a DataFrame."""
    return RunFolder(run_dir).log()


def profile_run_specs(profile, name: str, **overrides) -> tuple[ModelSpec, PretrainSpec]:
    """Model and pretraining specs of the profile's run ``name`` (``clip``, ``xcardia``, ``nw_only``, …), with
    ``overrides`` (e.g. ``epochs``, ``seed``, ``variant``) applied and the variant's settings resolved."""
    if name not in profile.pretrain_runs and name not in METHODS:
        raise XcardiaError(f"profile {profile.name!r} has no pretraining run {name!r}; "
                           f"choose one of {', '.join(profile.pretrain_runs)}")
    settings = {**profile.pretrain_runs.get(name, {"method": name}), **{k: v for k, v in overrides.items() if v is not None}}
    offset = settings.pop("seed_offset", 0)
    spec = replace(profile.pretrain, **settings)
    spec = replace(spec, seed=spec.seed + offset)
    return apply_variant(profile.model, spec)


def pretrain_profile_run(profile, name: str, data, runs_dir: str | os.PathLike, cache_dir=None, progress: bool = True,
                         log=print, **overrides) -> Path:
    """Pretrain the profile's run ``name`` into ``runs_dir/name``, or reuse it when that folder already holds the
    same finished run (how notebooks avoid retraining)."""
    model_spec, spec = profile_run_specs(profile, name, **overrides)
    folder = RunFolder(Path(runs_dir) / name)
    manifest = load_manifest(data)
    config = run_config(effective_model_spec(model_spec, spec), spec, profile.preprocess, manifest.attrs["path"],
                        DEFAULT_TABULAR_COLUMNS)
    if finished_run(folder.path, config, cohort_fingerprint(manifest)):
        log(f"[pretrain] reusing the finished run {folder.path}")
        return folder.path
    if folder.run_json.exists():
        previous = folder.info()["config"]
        diff = _config_differences(_comparable(previous), _comparable(config))
        if diff or previous["pretrain"]["epochs"] > spec.epochs:
            raise XcardiaError(f"{folder.path} holds a run with a different configuration ({'; '.join(diff[:5]) or 'more epochs'}); "
                               f"delete that folder or choose another output folder")
    resume = folder.checkpoint.exists()
    return pretrain(data, folder.path, model_spec, spec, profile.preprocess, cache_dir=cache_dir, resume=resume,
                    progress=progress, log=log)


def pretraining_selection_table(runs: dict):
    """Per run: the epoch the paper's rule selected (as ``run.json`` records it — never recomputed), its fused and
    image-only validation concept AUROC, the same at the last epoch, and the final NW τ (none for CLIP runs,
    which have no NW head; their concept AUROC is the NW read-out of embeddings CLIP alone trained)."""
    import pandas as pd

    rows = {}
    for name, run in runs.items():
        folder = RunFolder(run)
        info, log = folder.info(), folder.log()
        best = info["selection"]["epoch"]
        at_best = log[log["epoch"] == best].iloc[0] if best is not None else log.iloc[-1]
        last = log.iloc[-1]
        get = lambda row, key: float(row[key]) if key in row and pd.notna(row[key]) else math.nan  # noqa: E731
        rows[name] = {"seed": int(info["config"]["pretrain"]["seed"]), "best_epoch": int(best) if best else None,
                      "epochs": int(last["epoch"]),
                      "val_concept_map": get(at_best, "val_concept_map"),
                      "val_concept_auroc_at_best": get(at_best, "val_concept_auroc"),
                      "val_image_query_auroc_at_best": get(at_best, "val_image_query_concept_auroc"),
                      "val_concept_auroc_last": get(last, "val_concept_auroc"),
                      "val_image_query_auroc_last": get(last, "val_image_query_concept_auroc"),
                      # a CLIP run has no NW head: its τ column is the unused initial value, not a result
                      "final_nw_tau": math.nan if info["config"]["pretrain"]["method"] == "clip"
                      else get(last, "nw_temperature")}
    return pd.DataFrame(rows).T.astype({"seed": int, "epochs": int, "best_epoch": "Int64"})
