"""Every hyper-parameter of the ``paper`` downstream protocol and of the ``xcardia_paper`` pretraining variant,
pinned to the public code (sumona00/X-Cardia @ 4dfb3c3). Each row names the public file and line it reproduces;
a deliberate difference is not pinned here but listed in docs/method.md §6 (the deviation register).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xcardia.config import get_profile
from xcardia.models.image_encoder import PUBLIC_ARCHITECTURE
from xcardia.pretrain import apply_variant
from xcardia.specs import FinetuneSpec, PretrainSpec

PAPER_PROTOCOL = FinetuneSpec()
XCARDIA_PAPER_MODEL, XCARDIA_PAPER = apply_variant(get_profile("paper").model,
                                                   PretrainSpec(method="xcardia", variant="paper"))


@pytest.mark.parametrize("field, public, where", [
    ("lr", 5e-3, "Finetune/Finetuning.py:123 (--lr 5e-3), :431 AdamW"),
    ("weight_decay", 1e-3, "Finetune/Finetuning.py:124 (--weight_decay 1e-3)"),
    ("batch_size", 12, "Finetune/Finetuning.py:120 (--batch_size 12), :423 micro-batch"),
    ("grad_accum_steps", 2, "Finetune/Finetuning.py:127 (--grad_accum_steps 2), :424"),
    ("grad_clip", 1.0, "Finetune/Finetuning.py:428 (gradient_clipping 1.0)"),
    ("onecycle_pct_start", 0.1, "Finetune/Finetuning.py:443"),
    ("onecycle_div_factor", 1.0, "Finetune/Finetuning.py:445"),
    ("onecycle_final_div_factor", 10.0, "Finetune/Finetuning.py:446"),
    ("max_epochs", 100, "Finetune/Finetuning.py:122 (--n_epochs 100), :435 total_steps"),
    ("patience", 6, "Finetune/Finetuning.py:130 (--patience 6)"),
    ("min_delta", 1e-4, "Finetune/Finetuning.py:131 (--min_delta 1e-4), :594"),
    ("min_epochs", 6, "Finetune/Finetuning.py:132 (--min_epochs 6), :607"),
    ("reinit_feature", True, "Finetune/Finetuning.py:336-338 (backbone.fc = nn.Linear(in_f, 128) after loading)"),
    ("train_batchnorm", True, "Finetune/Finetuning.py:556 (model_engine.train(); layer4 trainable, :343)"),
    ("pos_weight_cap", None, "Finetune/Finetuning.py:449-459 (neg / max(1, pos), no cap)"),
    ("scratch_all_max_epochs", 100, "Finetune/Finetuning.py:122 (scratch shares the loop, :344-346)"),
    ("fraction_seeds", (123, 456, 789), "Finetune/Finetuning.py:141 (--seeds 123,456,789)"),
])
def test_paper_protocol_default_is_the_public_value(field, public, where):
    assert getattr(PAPER_PROTOCOL, field) == public, where


@pytest.mark.parametrize("get, public, where", [
    (lambda m, s: s.lr, 1e-4, "Pretrain/Pretraining.py:433 (--lr 1e-4)"),
    (lambda m, s: s.weight_decay, 1e-5, "Pretrain/Pretraining.py:434 (--wd 1e-5)"),
    (lambda m, s: s.batch_size, 8, "Pretrain/Pretraining.py:430 (--batch_size 8)"),
    (lambda m, s: s.epochs, 80, "Pretrain/Pretraining.py:432 (--epochs 80)"),
    (lambda m, s: (s.restart_period, s.restart_mult, s.min_lr), (10, 2, 1e-6), "Pretrain/Pretraining.py:516"),
    (lambda m, s: s.scheduler_epoch_lag, True, "Pretrain/Pretraining.py:555 (sched.step(epoch))"),
    (lambda m, s: s.lambda_nw, 0.5, "Pretrain/Pretraining.py:438 (--lambda_nw 0.5)"),
    (lambda m, s: m.clip_temperature, 0.07, "Pretrain/Pretraining.py:437 (--clip_temp 0.07)"),
    (lambda m, s: (m.nw_temperature, m.learnable_nw_temperature), (1.0, False), "Pretrain/Pretraining.py:237 (tau=1.0)"),
    (lambda m, s: (s.bank_k_per_concept, s.bank_refresh_every), (5, 5), "Pretrain/Pretraining.py:440-441"),
    (lambda m, s: s.kmeans_n_init, "auto", "Pretrain/Pretraining.py:310 (KMeans n_init='auto')"),
    (lambda m, s: s.tabular_missing, "knn", "Pretrain/Pretraining.py:91 (KNNImputer(n_neighbors=5))"),
    (lambda m, s: m.tabular_init, "xavier", "Pretrain/Pretraining.py:206-211 (xavier_uniform_ on every Linear)"),
    (lambda m, s: (m.proj_dim, m.image.feature_dim), (256, 128), "Pretrain/Pretraining.py:489, :508, :232-235"),
    (lambda m, s: s.nw_query, "fused", "Pretrain/Pretraining.py:260 (normalize(emb_img + emb_tab))"),
    (lambda m, s: m.image, PUBLIC_ARCHITECTURE, "Pretrain/Pretraining.py:490-499, Pretrain/resnet.py (Hara ResNet-50)"),
])
def test_xcardia_paper_pretraining_is_the_public_value(get, public, where):
    assert get(XCARDIA_PAPER_MODEL, XCARDIA_PAPER) == public, where


def test_the_public_scheduler_lag_trains_epoch_two_at_epoch_ones_rate():
    """Pretraining.py:555 steps ``sched.step(epoch)`` after 0-based epoch ``epoch``: epochs 1 and 2 share a rate."""
    import warnings

    def rates(lag: bool) -> list[float]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=1e-6)
        out = []
        for epoch in range(4):
            out.append(opt.param_groups[0]["lr"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched.step(epoch) if lag else sched.step()
        return out

    lagged, plain = rates(True), rates(False)
    assert lagged[0] == lagged[1] == plain[0] and lagged[2] == plain[1] and lagged[3] == plain[2]


def test_the_paper_protocol_schedule_is_the_public_one_cycle():
    """OneCycle with div_factor 1: 5e-3 through the 10 % warm-up, cosine down to 5e-4 at the last step, stepped per
    micro-batch (Finetuning.py:434-447, :569); gradients accumulated over 2 micro-batches, clipped to 1.0."""
    from xcardia.finetune import train_public_protocol

    spec = FinetuneSpec(max_epochs=10, patience=100)
    lin = torch.nn.Linear(3, 2)
    seen_lr, clipped = [], []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen_lr.append(self.param_groups[0]["lr"])
        clipped.append(math.sqrt(sum(float((p.grad ** 2).sum()) for p in lin.parameters())))
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        x = torch.randn(48, 3) * 100  # large inputs: the raw gradient norm is far above 1
        y = (torch.rand(48, 2) < 0.5).float()
        train_public_protocol(lin, lin.parameters(), lambda take: lin(x[take]), y, spec, seed=0, epochs=10)
    finally:
        torch.optim.AdamW.step = real_step
    # 48 rows / 12 = 4 micro-batches per epoch, 2 per optimiser step: 20 steps in 10 epochs
    assert len(seen_lr) == 20
    assert seen_lr[0] == pytest.approx(5e-3) and seen_lr[-1] == pytest.approx(5e-4, rel=0.05)
    assert all(a >= b - 1e-12 for a, b in zip(seen_lr, seen_lr[1:]))  # never rises (div_factor 1)
    assert max(clipped) <= 1.0 + 1e-5


def test_the_paper_protocol_reinitialises_the_feature_layer_and_trains_batchnorm():
    from xcardia.finetune import TopModel
    from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec

    enc = ImageEncoder(ImageEncoderSpec(arch="resnet10", widths=(8, 8, 16, 16), conv1_size=3, max_pool=False))
    top = TopModel(enc, 10, reinit_feature=True, train_batchnorm=True).train()
    assert not torch.equal(top.feature.weight, enc.feature.weight)
    assert all(m.training for m in top.modules() if isinstance(m, torch.nn.BatchNorm3d))
    kept = TopModel(enc, 10, reinit_feature=False, train_batchnorm=False).train()
    assert torch.equal(kept.feature.weight, enc.feature.weight)
    assert not any(m.training for m in kept.modules() if isinstance(m, torch.nn.BatchNorm3d))
    np.testing.assert_array_equal(top.layer4[0].conv1.weight.detach(), enc.backbone.layer4[0].conv1.weight.detach())


@pytest.mark.parametrize("variant, n_init", [("paper", "auto"), ("fixed", 10)])
def test_the_support_bank_kmeans_runs_with_the_variants_n_init(variant, n_init, monkeypatch):
    """The spec's ``kmeans_n_init`` reaches scikit-learn's ``KMeans`` through the engine's bank rebuild (the public
    ``Pretraining.py:310`` passes ``n_init="auto"``); a pin of the spec field alone could not see it dropped."""
    import types

    import sklearn.cluster

    from xcardia.pretrain import _Run

    seen = []

    class SpyKMeans(sklearn.cluster.KMeans):
        def fit(self, *a, **k):
            seen.append(self.n_init)
            return super().fit(*a, **k)

    monkeypatch.setattr(sklearn.cluster, "KMeans", SpyKMeans)
    _, spec = apply_variant(get_profile("smoke").model, PretrainSpec(method="xcardia", variant=variant))
    rng = np.random.default_rng(0)
    embedded = {"query": torch.as_tensor(rng.normal(size=(40, 8)), dtype=torch.float32),
                "concepts": torch.as_tensor((rng.random((40, 4)) < 0.5).astype(np.float32)),
                "index": torch.arange(40)}
    run = types.SimpleNamespace(spec=spec, model=None, precision=types.SimpleNamespace(autocast=None),
                                embed_train=lambda *a: embedded)
    bank = _Run.rebuild_kmeans_bank(run)
    assert len(bank.indices) > 0 and seen and set(seen) == {n_init}


@pytest.mark.parametrize("schedule", ["span", "public_length"])
def test_the_kshot_schedule_is_the_one_cycle_the_spec_names(schedule):
    """5 shots (10 rows: one micro-batch per epoch, an optimiser step every second epoch) for 25 epochs, as the
    ``cpu`` profile runs them. ``span`` (the default, register D9): the OneCycle spans exactly the run — 5e-3 through
    the warm-up, then a cosine that reaches the public final rate 5e-4 at the last micro-batch. ``public_length``:
    the schedule sized for 100 epochs, cut after 25 — every step within 10 % of the 5e-3 peak."""
    from xcardia.finetune import EncodedInit, train_top
    from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec

    spec = FinetuneSpec(kshot_epochs=25, kshot_schedule=schedule)
    encoder = ImageEncoder(ImageEncoderSpec(arch="resnet10", widths=(8, 8, 16, 16), conv1_size=3, max_pool=False))
    with torch.no_grad():
        trunk = encoder.eval().trunk(torch.randn(10, 1, 16, 16, 16))
    init = EncodedInit("x", encoder, np.arange(10), trunk, np.zeros((10, 128)), {i: i for i in range(10)})
    labels = np.array([[1.0]] * 5 + [[0.0]] * 5)
    seen_lr = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen_lr.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        train_top(init, labels, np.arange(10), None, spec, seed=0, epochs=spec.kshot_epochs)
    finally:
        torch.optim.AdamW.step = real_step
    assert len(seen_lr) == 12  # 25 micro-batches, an optimiser step after every second
    assert seen_lr[0] == pytest.approx(5e-3)
    assert all(a >= b - 1e-12 for a, b in zip(seen_lr, seen_lr[1:]))
    if schedule == "span":
        # the last optimiser step comes one micro-batch before the schedule's end: within 5 % of 5e-4
        assert 5e-4 <= seen_lr[-1] <= 1.05 * 5e-4
        assert seen_lr[6] < 0.7 * 5e-3  # annealing by mid-run
    else:
        assert min(seen_lr) > 0.9 * 5e-3
