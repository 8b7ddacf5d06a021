"""Downstream evaluation: subset samplers, protocols, the end-to-end commands, determinism and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import xcardia.finetune as finetune
from xcardia.cli import main
from xcardia.schema import LABELS
from xcardia.finetune import fraction_subset, kshot_subset


def _labels(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.05, 0.5]).astype(float)
    y[rng.random((n, 3)) < 0.1] = np.nan
    return y


def test_kshot_subset_has_exactly_k_positives_and_k_negatives_from_the_training_rows():
    y = _labels()
    train = np.arange(0, 150)
    for k in (1, 5, 10):
        rows, reason = kshot_subset(y, train, 0, k, seed=3)
        assert reason is None and len(rows) == 2 * k and set(rows) <= set(train)
        assert (y[rows, 0] == 1).sum() == k and (y[rows, 0] == 0).sum() == k


def test_kshot_subset_is_deterministic_and_depends_only_on_seed_task_and_k():
    y = _labels()
    train = np.arange(150)
    a, _ = kshot_subset(y, train, 0, 5, 7)
    b, _ = kshot_subset(y.copy(), train.copy(), 0, 5, 7)
    c, _ = kshot_subset(y, train, 0, 5, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_kshot_with_too_few_positives_is_skipped_with_the_reason():
    y = _labels()
    train = np.arange(150)
    n_pos = int((y[train, 1] == 1).sum())
    rows, reason = kshot_subset(y, train, 1, n_pos + 1, 0)
    assert rows is None and f"only {n_pos} positive(s)" in reason


def test_fraction_subset_size_and_determinism():
    train = np.arange(10, 810)
    sub = fraction_subset(train, 0.1, 123)
    assert len(sub) == 80 and set(sub) <= set(train)
    assert np.array_equal(sub, fraction_subset(train, 0.1, 123))
    assert len(fraction_subset(train, 0.0001, 1)) == 1


def test_paper_protocol_counts_pos_weight_on_the_subset_it_trains_on(monkeypatch):
    from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec

    spec = ImageEncoderSpec(arch="resnet10", widths=(8, 8, 16, 16), conv1_size=3, max_pool=False)
    encoder = ImageEncoder(spec)
    volumes = torch.randn(30, 1, 24, 24, 24)
    with torch.no_grad():
        encoder.eval()
        trunk = encoder.trunk(volumes)
    init = finetune.EncodedInit("x", encoder, np.arange(30), trunk, np.zeros((30, 128)), {i: i for i in range(30)})
    labels = (np.random.default_rng(0).random((30, 2)) < 0.4).astype(float)
    seen = []
    from xcardia.finetune import protocol

    real = protocol.pos_weight_from_subset
    monkeypatch.setattr(protocol, "pos_weight_from_subset", lambda y, *a: seen.append(y.clone()) or real(y, *a))
    subset = np.array([1, 4, 7, 9, 12, 20])
    finetune.train_top(init, labels, subset, None, finetune.FinetuneSpec(), seed=0, epochs=1)
    torch.testing.assert_close(seen[0], torch.as_tensor(labels[subset]))


@pytest.fixture(scope="module")
def tiny_run(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "xcardia"
    assert main(["pretrain", "--method", "xcardia", "--data", str(tiny_cohort), "--profile", "smoke", "--out", str(out),
                 "--epochs", "1", "--batch-size", "8"]) == 0
    return out


def test_finetune_and_fewshot_end_to_end_and_deterministic(tiny_cohort, tiny_run, tmp_path):
    for out in ("a", "b"):
        assert main(["finetune", "--init", "scratch", "--init", str(tiny_run), "--data", str(tiny_cohort),
                     "--profile", "smoke", "--out", str(tmp_path / out)]) == 0
        assert main(["fewshot", "--init", "scratch", "--init", str(tiny_run), "--data", str(tiny_cohort),
                     "--profile", "smoke", "--out", str(tmp_path / out / "fs"), "--k", "1,2", "--seeds", "2"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert a == json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert json.loads((tmp_path / "a" / "fs" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "b" / "fs" / "metrics.json").read_text())
    protocols = {row["init"] for row in a["finetune"]["full_label"]["paper"]}
    assert protocols == {"scratch", "xcardia"} and "scratch_all" in a["finetune"]["full_label"]
    full = pd.DataFrame(a["finetune"]["full_label"]["paper"])
    assert {"auroc", "ci_low", "ci_high", "n_pos", "n_neg"} <= set(full.columns)
    subsets = json.loads((tmp_path / "a" / "fs" / "kshot_subsets.json").read_text())
    assert set(subsets) == {"s0"} and set(subsets["s0"]) == set(LABELS)  # both inits are seed 0: one set of draws
    records = pd.read_csv(tmp_path / "a" / "fs" / "kshot_records.csv")
    scored = records[records["skipped"].isna()]
    for task, k, seed in scored[["task", "value", "seed"]].drop_duplicates().itertuples(index=False):
        ids = subsets["s0"][task][str(k)][str(seed)]
        assert len(ids) == 2 * k  # the same saved subset for every init of the seed
    assert (tmp_path / "a" / "summary.md").read_text().count("The paper's claims") == 1


def test_fewshot_records_skips_and_tasks_without_test_positives(tiny_cohort, tiny_run, tmp_path):
    assert main(["fewshot", "--init", "scratch", "--data", str(tiny_cohort), "--profile", "smoke",
                 "--out", str(tmp_path), "--k", "30", "--seeds", "1"]) == 0
    records = pd.read_csv(tmp_path / "kshot_records.csv")
    assert records["skipped"].str.contains("k=30 needs 30 of each").all()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["fewshot"]["skipped"]) == len(LABELS)


@pytest.mark.parametrize("init, message", [("does/not/exist", "does not exist"), ("NOTES", "not a readable weights file")])
def test_bad_init_is_refused(tiny_cohort, tmp_path, capsys, init, message):
    if init == "NOTES":
        init = str(tmp_path / "notes.pt")
        (tmp_path / "notes.pt").write_text("not weights")
    code = main(["finetune", "--init", init, "--data", str(tiny_cohort), "--profile", "smoke", "--out", str(tmp_path / "o")])
    assert code == 2 and message in capsys.readouterr().err


def test_encoder_from_another_geometry_is_refused(tiny_cohort, tiny_run, tmp_path, capsys):
    code = main(["finetune", "--init", str(tiny_run), "--data", str(tiny_cohort), "--profile", "paper",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pretrained on" in err


def test_bad_k_is_refused(tiny_cohort, tmp_path, capsys):
    assert main(["fewshot", "--init", "scratch", "--data", str(tiny_cohort), "--profile", "smoke", "--out",
                 str(tmp_path), "--k", "0,5"]) == 2
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("scores, stop_at, best", [
    ([0.6, 0.7, 0.65, 0.64], 4, 0.7),                  # patience 2 runs out after two worse epochs
    ([float("nan"), float("nan"), float("nan")], None, None),  # no information: never stops, keeps the last state
    ([float("nan"), 0.6, float("nan"), 0.55, 0.5], 5, 0.6),   # NaN neither improves nor advances the patience
])
def test_early_stopping_has_one_nan_rule(scores, stop_at, best):
    """(min_delta 0, no minimum: the NaN rule alone.)"""
    from xcardia.finetune import EarlyStopping

    stopper = EarlyStopping(patience=2)
    stopped = None
    for epoch, score in enumerate(scores, start=1):
        if stopper.step(score, lambda e=epoch: {"epoch": e}):
            stopped = epoch
            break
    assert stopped == stop_at
    if best is None:
        assert stopper.best_state == {"epoch": len(scores)}
    else:
        assert stopper.best == best


@pytest.mark.parametrize("scores, patience, min_delta, min_epochs, stop_at, best_epoch", [
    # the public rule (Finetuning.py:592-616): an improvement must beat the best by more than min_delta ...
    ([0.70, 0.70005, 0.7001, 0.69], 2, 1e-4, 0, 3, 1),
    ([0.70, 0.7002, 0.69, 0.69], 2, 1e-4, 0, 4, 2),
    # ... and no stop before min_epochs, however long the stale run
    ([0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], 2, 1e-4, 6, 6, 1),
    ([0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], 2, 1e-4, 0, 3, 1),
])
def test_early_stopping_follows_the_public_min_delta_and_min_epochs(scores, patience, min_delta, min_epochs, stop_at,
                                                                     best_epoch):
    from xcardia.finetune import EarlyStopping

    stopper = EarlyStopping(patience, min_delta, min_epochs)
    stopped = next((e for e, s in enumerate(scores, start=1) if stopper.step(s, lambda e=e: e)), None)
    assert stopped == stop_at and stopper.best_epoch == best_epoch == stopper.best_state


def test_fraction_subset_draws_as_the_public_sweep():
    """Finetuning.py:351-358: RandomState(seed + round(1000·fraction)), floor(fraction·n) rows, sorted."""
    rows = np.arange(100, 400)
    expected = np.sort(np.random.RandomState(123 + 100).choice(300, size=30, replace=False))
    assert np.array_equal(fraction_subset(rows, 0.1, 123), rows[expected])


def test_a_task_without_training_positives_is_skipped_in_the_trained_macro_and_scored_in_the_public_one():
    """Issue 22.7: at a small fraction a head can see no positive of a task; the companion's macro does not score
    it. Issue 30.4: the public macro (every task with both classes in test, ``Finetuning.py:504-521``) scores the
    head the loop left; ``curve_table`` reports both, each with the number of tasks it averages."""
    from xcardia.reporting import curve_table
    from xcardia.finetune import task_record

    y_test = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    scores = np.array([0.9, 0.1, 0.8, 0.2])
    kept = task_record("paper", "x", "fraction", 0.01, 123, 0, y_test, scores, 3, 5)
    dropped = task_record("probe", "x", "fraction", 0.01, 123, 1, y_test, scores, 0, 8)
    assert kept["skipped"] is None and kept["auroc"] == 1.0
    assert dropped["skipped"] == "no positive in the training subset" and math.isnan(dropped["auroc"])
    assert kept["auroc_public"] == 1.0 and dropped["auroc_public"] == 0.25 # the head's scores, scored as public code
    no_test_positive = task_record("paper", "x", "fraction", 0.01, 123, 1, y_test[[0, 3]], scores[[0, 3]], 3, 5)
    assert math.isnan(no_test_positive["auroc_public"])  # both definitions need both classes in test

    dropped_paper = task_record("paper", "x", "fraction", 0.01, 123, 1, y_test, scores, 0, 8)
    curve = curve_table(pd.DataFrame([kept, dropped_paper]), "fraction").iloc[0]
    assert (curve["mean"], curve["n_tasks"]) == (1.0, 1)
    assert (curve["public_mean"], curve["public_n_tasks"]) == (0.625, 2)


def test_encodings_are_reused_exactly_and_recomputed_when_the_entry_or_the_weights_change(tiny_cohort, tiny_run,
                                                                                          tmp_path, monkeypatch):
    from xcardia.config import get_profile
    from xcardia.data.dataset import CohortDataset
    from xcardia.data.manifest import load_manifest

    profile, manifest, cache = get_profile("smoke"), load_manifest(tiny_cohort), tmp_path / "cache"
    first = finetune.prepare_experiment(profile, manifest, {"x": str(tiny_run)}, cache, profile.finetune, log=lambda *_: None)
    entries = sorted((cache / "encoded").rglob("*.pt"))
    assert len(entries) == 1
    union = CohortDataset.from_parts([first.datasets[s] for s in ("train", "val", "test")])
    fresh = finetune.encode("x", first.inits["x"].encoder, union)
    assert torch.equal(fresh.trunk, first.inits["x"].trunk) and np.array_equal(fresh.features, first.inits["x"].features)

    from xcardia.finetune import encoding

    real_encode = encoding.encode
    monkeypatch.setattr(encoding, "encode", lambda *a, **k: pytest.fail("a cached encoding was computed again"))
    again = finetune.prepare_experiment(profile, manifest, {"x": str(tiny_run)}, cache, profile.finetune, log=lambda *_: None)
    assert torch.equal(again.inits["x"].trunk, fresh.trunk) and np.array_equal(again.inits["x"].features, fresh.features)

    monkeypatch.setattr(encoding, "encode", real_encode)
    entries[0].write_bytes(b"not a tensor file")
    lines = []
    rebuilt = finetune.prepare_experiment(profile, manifest, {"x": str(tiny_run)}, cache, profile.finetune, log=lines.append)
    assert any("unreadable" in line and str(entries[0]) in line for line in lines)
    assert torch.equal(rebuilt.inits["x"].trunk, fresh.trunk)

    other = finetune.prepare_experiment(profile, manifest, {"s": "scratch:1"}, cache, profile.finetune, log=lambda *_: None)
    assert len(sorted((cache / "encoded").rglob("*.pt"))) == 2  # other weights, another entry
    assert not torch.equal(other.inits["s"].trunk, fresh.trunk)


def test_an_encoding_that_cannot_be_kept_is_said_once_and_the_evaluation_goes_on(tmp_path):
    from xcardia.config import get_profile
    from xcardia.models.image_encoder import ImageEncoder

    class Volumes(torch.utils.data.Dataset):
        rows = np.arange(3)
        _v = torch.randn(3, 1, 32, 32, 32)

        def __len__(self):
            return 3

        def image(self, i):
            return self._v[i, 0].numpy()

        def __getitem__(self, i):
            return {"image": self._v[i]}

    encoder = ImageEncoder(get_profile("smoke").model.image).eval()
    (tmp_path / "encoded").write_text("a file where the cache folder should be")
    lines = []
    out = finetune.encode_cached("x", encoder, Volumes(), tmp_path, log=lines.append)
    assert torch.equal(out.trunk, finetune.encode("x", encoder, Volumes()).trunk)
    assert len(lines) == 1 and "could not keep x's encoding" in lines[0]
    assert (tmp_path / "encoded").read_text() == "a file where the cache folder should be"  # nothing overwritten


class _RandomVolumes(torch.utils.data.Dataset):
    """A stand-in for a CohortDataset: ``n`` volumes of HU-like contrast (positive mean, SD far from 1)."""

    def __init__(self, n: int, seed: int = 0, offset: int = 0):
        g = torch.Generator().manual_seed(seed)
        self._v = 0.3 + 0.5 * torch.randn(n, 1, 32, 32, 32, generator=g)
        self.rows = np.arange(offset, offset + n)

    def __len__(self):
        return len(self._v)

    def image(self, i):
        return self._v[i, 0].numpy()

    def __getitem__(self, i):
        return {"image": self._v[i]}


def _trunk_batchnorm_outputs(encoder, volumes) -> list[torch.Tensor]:
    """Every frozen-trunk BatchNorm's eval-mode output on ``volumes``, as (channels, values)."""
    outputs, hooks = [], []
    b = encoder.backbone
    for module in torch.nn.ModuleList([b.bn1, b.layer1, b.layer2, b.layer3]).modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            hooks.append(module.register_forward_hook(
                lambda m, i, o: outputs.append(o.transpose(0, 1).reshape(o.shape[1], -1))))
    with torch.no_grad():
        encoder.eval().trunk(torch.stack([volumes[i]["image"] for i in range(len(volumes))]))
    for h in hooks:
        h.remove()
    return outputs


def test_a_scratch_trunk_is_normalised_once_its_batchnorm_is_reestimated_on_the_training_volumes():
    """Issue 30.1: a scratch init's BatchNorm statistics are 0 / 1, so in eval mode its frozen trunk is not
    normalised at all; re-estimated on the training volumes (the adopted treatment), every trunk BatchNorm's
    output has per-channel mean ≈ 0 and SD ≈ 1 on those volumes, as in the public loop's train-mode trunk."""
    from xcardia.config import get_profile
    from xcardia.models.image_encoder import ImageEncoder

    torch.manual_seed(0)
    scratch = ImageEncoder(get_profile("smoke").model.image).eval()
    train = _RandomVolumes(36)
    before = _trunk_batchnorm_outputs(scratch, train)
    assert max(float(o.std(1).sub(1).abs().max()) for o in before) > 0.5  # identity BatchNorm: not normalised

    treated = finetune.reestimate_trunk_batchnorm(scratch, train, batch_size=12)
    after = _trunk_batchnorm_outputs(treated, train)
    assert len(after) == len(before) > 3
    for o in after:
        assert float(o.mean(1).abs().max()) < 0.15 and float(o.std(1).sub(1).abs().max()) < 0.15
    # only the frozen stages moved: weights, layer4's statistics and the feature layer are the init's
    same = {k: torch.equal(v, treated.state_dict()[k]) for k, v in scratch.state_dict().items()}
    assert all(v for k, v in same.items() if not k.startswith(("backbone.bn1.", "backbone.layer1.", "backbone.layer2.",
                                                              "backbone.layer3.")) or not k.endswith(("running_mean",
                                                              "running_var", "num_batches_tracked")))
    assert not all(same.values())


def test_a_reestimated_encoding_is_cached_with_its_statistics_and_keyed_apart_from_the_init_ones(tmp_path):
    """The cache keeps the re-estimated statistics (so the init's encoder — what a bundle exports — carries them
    when read back) and never serves an init-statistics entry for a re-estimated request or the reverse."""
    from xcardia.config import get_profile
    from xcardia.models.image_encoder import ImageEncoder

    torch.manual_seed(1)
    encoder = ImageEncoder(get_profile("smoke").model.image).eval()
    union, train = _RandomVolumes(20, seed=2), _RandomVolumes(12, seed=2)
    plain = finetune.encode_cached("x", encoder, union, tmp_path, log=lambda *_: None)
    first = finetune.encode_cached("x", encoder, union, tmp_path, log=lambda *_: None, batchnorm_data=train)
    assert len(list((tmp_path / "encoded").rglob("*.pt"))) == 2
    assert not torch.equal(plain.trunk, first.trunk)
    again = finetune.encode_cached("x", encoder, union, tmp_path, log=lambda *_: None, batchnorm_data=train)
    assert torch.equal(again.trunk, first.trunk)
    expected = finetune.trunk_batchnorm_state(first.encoder)
    assert all(torch.equal(v, finetune.trunk_batchnorm_state(again.encoder)[k]) for k, v in expected.items())
    assert torch.equal(finetune.encode("x", again.encoder, union).trunk, first.trunk)  # the encoder computes it
    # the caller's encoder is never modified
    assert all(torch.equal(v, finetune.trunk_batchnorm_state(encoder)[k]) for k, v in
               finetune.trunk_batchnorm_state(plain.encoder).items())


def test_the_exact_public_semantic_trains_layer4_and_the_heads_and_moves_only_the_trunks_batchnorm_statistics():
    """``train_frozen_trunk_network`` is the reference of the trunk-BatchNorm benchmark: the stem and layer1–3 keep
    their weights while their running statistics move toward the training volumes (``model_engine.train()``,
    ``Finetuning.py:556``); layer4 and the re-initialised feature layer train; the heads start as TopModel's."""
    from xcardia.config import get_profile
    from xcardia.finetune.whole_network import FrozenTrunkNetwork
    from xcardia.models.image_encoder import ImageEncoder

    torch.manual_seed(0)
    encoder = ImageEncoder(get_profile("smoke").model.image).eval()
    train, test = _RandomVolumes(10, seed=3), _RandomVolumes(6, seed=4, offset=10)
    labels = np.zeros((16, 1))
    labels[[0, 2, 4, 6, 8, 11, 13], 0] = 1
    captured = {}
    real_init = FrozenTrunkNetwork.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        captured["net"] = self

    FrozenTrunkNetwork.__init__ = keep
    try:
        p = finetune.train_frozen_trunk_network(encoder, train, None, test, labels, finetune.FinetuneSpec(kshot_epochs=3),
                                                seed=0, epochs=3)
    finally:
        FrozenTrunkNetwork.__init__ = real_init
    assert p.shape == (6, 1) and np.isfinite(p).all()
    trained = captured["net"].encoder.state_dict()
    before = encoder.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.",
                                                 "backbone.layer3."))]
    weights = [k for k in frozen if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats = [k for k in frozen if k.endswith("running_mean")]
    assert all(torch.equal(before[k], trained[k]) for k in weights)
    assert all(not torch.equal(before[k], trained[k]) for k in stats)
    assert not torch.equal(before["backbone.layer4.0.conv1.weight"], trained["backbone.layer4.0.conv1.weight"])
    torch.manual_seed(5)
    top = finetune.TopModel(encoder, 1)
    torch.manual_seed(5)
    whole = FrozenTrunkNetwork(encoder, 1)
    assert torch.equal(top.heads.weight, whole.heads.weight) and torch.equal(top.feature.weight, whole.encoder.feature.weight)
