"""The hyper-parameters of pretraining and of downstream evaluation: plain frozen dataclasses, a leaf module so that
configuration (:mod:`xcardia.config`) imports no engine. Runtime switches (workers, ``compile``, activation
checkpointing) sit beside the hyper-parameters but may change on ``--resume`` (``RESUMABLE_DIFFERENCES``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from xcardia.errors import XcardiaError

METHODS = ("clip", "xcardia", "nw_only")
VARIANTS = ("paper", "fixed")


@dataclass(frozen=True)
class PretrainSpec:
    """Pretraining hyper-parameters (defaults: the public code's).

    Attributes:
        method: ``clip``, ``xcardia`` or ``nw_only``.
        variant: ``paper`` or ``fixed`` (see the module docstring); applied by :func:`apply_variant`.
        epochs, batch_size, lr, weight_decay: paper: 80, 8 per GPU, 1e-4, 1e-5 (AdamW).
        restart_period, restart_mult, min_lr: cosine annealing with warm restarts (paper: 10, 2, 1e-6).
        lambda_nw: weight of the NW loss (paper: 0.5).
        nw_query: ``fused`` (paper) or ``image``.
        nw_kernel: ``cosine`` (paper) or ``euclidean``.
        bank: ``kmeans`` (paper), ``queue`` or ``batch``.
        bank_k_per_concept, bank_refresh_every: paper: 5 exemplars per concept, rebuilt every 5 epochs.
        queue_size: capacity of the queue bank.
        tabular_missing: ``token`` (learned missing tokens) or ``knn`` (the paper's imputation).
        kmeans_n_init: k-means restarts of the support bank (public: ``"auto"``, ``Pretraining.py:310``; fixed: 10).
        scheduler_epoch_lag: step the cosine schedule as ``sched.step(epoch)`` after epoch ``epoch`` (0-based), as the
            public code does (``Pretraining.py:555``), so every epoch after the first trains at the previous epoch's
            rate; the ``paper`` variant reproduces it, the ``fixed`` one steps without the lag.
        scarf_rate: share of tabular features corrupted per row (0 = off).
        augment: small affine and noise augmentation of the CT (off, as the public code's default).
        num_workers: data loader processes.
        in_memory: keep preprocessed CTs in RAM (CPU-sized profiles).
        bf16, channels_last: bfloat16 autocast and the ``channels_last_3d`` layout. ``bf16``: True (asked: on a CPU
            only where it reports bf16 units, :mod:`xcardia.precision`), False, or ``"gpu"`` (bf16 on a GPU, fp32 on a
            CPU — the ``paper`` profile's: the public code trains in fp32, register P11).
        activation_checkpointing, compile: GPU options (ignored on CPU).
        seed: everything random (initialisation, order, augmentation, k-means).
    """

    method: str = "xcardia"
    variant: str = "fixed"
    epochs: int = 80
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-5
    restart_period: int = 10
    restart_mult: int = 2
    min_lr: float = 1e-6
    lambda_nw: float = 0.5
    nw_query: str = "fused"
    nw_kernel: str = "cosine"
    bank: str = "kmeans"
    bank_k_per_concept: int = 5
    bank_refresh_every: int = 5
    queue_size: int = 4096
    tabular_missing: str = "token"
    kmeans_n_init: int | str = 10
    scheduler_epoch_lag: bool = False
    scarf_rate: float = 0.0
    augment: bool = False
    num_workers: int = 0
    in_memory: bool = False
    bf16: bool | str = False
    channels_last: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise XcardiaError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.variant not in VARIANTS:
            raise XcardiaError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name, allowed in (("nw_query", ("fused", "image")), ("nw_kernel", ("cosine", "euclidean")),
                              ("bank", ("kmeans", "queue", "batch")), ("tabular_missing", ("token", "knn"))):
            if getattr(self, name) not in allowed:
                raise XcardiaError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.bf16 not in (True, False, "gpu"):
            raise XcardiaError(f"bf16 must be true, false or 'gpu', got {self.bf16!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise XcardiaError("epochs must be ≥ 1 and batch_size ≥ 2 (CLIP needs negatives)")

    @property
    def clip_weight(self) -> float:
        return 0.0 if self.method == "nw_only" else 1.0

    @property
    def nw_weight(self) -> float:
        return 0.0 if self.method == "clip" else self.lambda_nw


@dataclass(frozen=True)
class FinetuneSpec:
    """Downstream settings (fixed before any result was seen, identical for every init).

    The ``paper`` protocol's hyper-parameters are the public ``Finetune/Finetuning.py``'s (sumona00/X-Cardia at
    4dfb3c3); ``tests/test_protocol_pinning.py`` pins each one to its public line, and ``docs/method.md`` §6 lists
    every difference. Profiles may shorten the schedule (``smoke``); the public values are the defaults.

    Attributes:
        lr, weight_decay: AdamW (Finetuning.py:123-124, :431); also OneCycle's peak, ``max(lr, 1e-3)`` (:436-437).
        batch_size, grad_accum_steps: micro-batch 12 with 2 accumulation steps (:120, :127, :423-424).
        grad_clip: gradient-norm clip at every optimiser step (:428).
        onecycle_pct_start, onecycle_div_factor, onecycle_final_div_factor: OneCycleLR, cosine (:439-447), stepped
            per micro-batch (:569) over ``max_epochs`` epochs.
        max_epochs, patience, min_delta, min_epochs: early stopping on validation macro AUROC (:122, :130-132,
            :592-616); the best epoch's weights are tested (:619-626).
        reinit_feature: the 2048 → 128 feature layer after the backbone is re-initialised (:336-338).
        train_batchnorm: BatchNorm of the trained stage in training mode (``model_engine.train()``, :556).
        pos_weight_cap: an upper bound on BCE ``pos_weight`` (None: the public code has none, :449-459).
        kshot_epochs: k-shot fine-tuning runs this many epochs, no early stopping (a k-shot user has no labelled
            validation set; the public code has no k-shot sampler).
        kshot_schedule: ``"span"``: the k-shot OneCycle spans exactly ``kshot_epochs`` (warm-up, then cosine to the
            final rate, as the public schedule does over its run); ``"public_length"``: sized for ``max_epochs`` and
            cut after ``kshot_epochs`` (the rate never anneals; the reference runs before issue 30). Decided before
            any number with it existed (register D9).
        trunk_batchnorm: the frozen stages' BatchNorm statistics. ``"train_split"`` (the default since issue 30):
            re-estimated once per init on the training split's volumes, in micro-batches of ``batch_size``, the
            closest cached stand-in for the public loop's train-mode trunk (``Finetuning.py:556``), measured by
            ``bench/trunk_batchnorm.py`` (register D3); ``"init"``: the init's own statistics in eval mode (the runs
            before issue 30; for a scratch init mean 0 / variance 1, i.e. no normalisation). The frozen trunk is
            then cached either way.
        scratch_all_max_epochs: the all-layers-trainable scratch baseline (public: the same 100).
        batched_kshot: train the k-shot ``paper`` runs of one init and k as grouped models (:mod:`xcardia.batched`;
            same predictions to float tolerance). Off by default: on this 2-core CPU the grouped 3-D convolutions
            were 0.56× the speed of the one-at-a-time loop (45 runs of the ``cpu`` profile: 33.7 s vs 19.1 s).
        kshot_group_size: members per grouped model.
    """

    lr: float = 5e-3
    weight_decay: float = 1e-3
    batch_size: int = 12
    grad_accum_steps: int = 2
    grad_clip: float = 1.0
    onecycle_pct_start: float = 0.1
    onecycle_div_factor: float = 1.0
    onecycle_final_div_factor: float = 10.0
    max_epochs: int = 100
    patience: int = 6
    min_delta: float = 1e-4
    min_epochs: int = 6
    reinit_feature: bool = True
    train_batchnorm: bool = True
    pos_weight_cap: float | None = None
    kshot_epochs: int = 40
    kshot_schedule: str = "span"
    trunk_batchnorm: str = "train_split"
    scratch_all_max_epochs: int = 100
    batched_kshot: bool = False
    kshot_group_size: int = 64
    fractions: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0)
    fraction_seeds: tuple[int, ...] = (123, 456, 789)
    scratch_all_fractions: tuple[float, ...] = (1.0,)
    scratch_all_seeds: tuple[int, ...] = (123,)
    ks: tuple[int, ...] = (1, 5, 10, 25)
    kshot_seeds: int = 10
    kshot_protocols: tuple[str, ...] = ("probe", "paper")
    kshot_paper_ks: tuple[int, ...] = (1, 5, 10, 25)
    probe_c: float = 1.0
    n_boot: int = 1000

    def __post_init__(self):
        for name, allowed in (("kshot_schedule", ("span", "public_length")), ("trunk_batchnorm", ("init", "train_split"))):
            if getattr(self, name) not in allowed:
                raise XcardiaError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
