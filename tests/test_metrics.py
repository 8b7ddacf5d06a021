"""Metrics against scikit-learn and hand-worked cases; bootstrap coverage on simulated scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from xcardia.metrics import (
    auprc,
    auroc,
    auroc_many,
    bootstrap_auroc_ci,
    expected_calibration_error,
    mean_ci,
    paired_bootstrap_difference,
)


def test_auroc_hand_worked_with_a_tie_and_missing_labels():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) (0.8>0.1) (0.4=0.4 → ½) (0.4>0.1) = 3.5 / 4
    y = [1, 1, 0, 0, np.nan]
    s = [0.8, 0.4, 0.4, 0.1, 0.9]
    assert auroc(y, s) == pytest.approx(0.875)
    assert auroc_many(np.array([[1, 1, 0, 0]]), np.array([[0.8, 0.4, 0.4, 0.1]]))[0] == pytest.approx(0.875)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_auprc_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.2).astype(float)
    s = rng.normal(size=300) + y
    s[::7] = np.round(s[::7], 1)  # ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert auroc_many(y[None], s[None])[0] == pytest.approx(roc_auc_score(y, s))
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s))


def test_auroc_is_nan_without_both_classes():
    assert math.isnan(auroc([1, 1, np.nan], [0.1, 0.2, 0.3]))
    assert math.isnan(bootstrap_auroc_ci([0, 0, 0], [0.1, 0.2, 0.3])["auroc"])


def test_expected_calibration_error_hand_worked():
    # bin [0.1,0.2): p=0.1,0.1 with y=0,1 → |0.5−0.1|·2/4; bin [0.9,1]: p=0.9,0.9 with y=1,1 → |1−0.9|·2/4
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.2 + 0.05)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)


def test_bootstrap_ci_covers_the_true_auroc_at_about_the_nominal_rate():
    d = 1.0  # binormal scores: true AUROC = Φ(d/√2)
    truth = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for t in range(trials):
        y = np.r_[np.ones(60), np.zeros(140)]
        s = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 140)]
        ci = bootstrap_auroc_ci(y, s, n_boot=400, seed=t)
        covered += ci["ci_low"] <= truth <= ci["ci_high"]
    assert 0.89 <= covered / trials <= 0.99


def test_bootstrap_is_seeded_and_averages_runs():
    rng = np.random.default_rng(1)
    y = (rng.random(100) < 0.3).astype(float)
    runs = np.stack([rng.normal(size=100) + y for _ in range(3)])
    a = bootstrap_auroc_ci(y, runs, n_boot=200, seed=5)
    assert a == bootstrap_auroc_ci(y, runs, n_boot=200, seed=5)
    assert a["auroc"] == pytest.approx(np.mean([roc_auc_score(y, r) for r in runs]))
    assert a["ci_low"] < a["auroc"] < a["ci_high"]
    assert (a["n_pos"], a["n_neg"]) == (int(y.sum()), int((1 - y).sum()))


def test_paired_difference_is_zero_for_identical_scores_and_detects_a_real_gap():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.3).astype(float)
    good = y + rng.normal(0, 0.7, 400)
    bad = y + rng.normal(0, 2.0, 400)
    same = paired_bootstrap_difference(y, good, good, n_boot=200)
    assert same["difference"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    gap = paired_bootstrap_difference(y, good, bad, n_boot=300)
    assert gap["difference"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, bad))
    assert gap["ci_low"] > 0


def test_mean_ci_over_seeds():
    out = mean_ci([0.6, 0.7, np.nan, 0.8])
    assert out["mean"] == pytest.approx(0.7) and out["n"] == 3
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) · sd / √n
    assert out["ci_high"] - out["mean"] == pytest.approx(half)


def test_macro_auroc_ci_and_paired_macro_difference_with_missing_labels():
    from xcardia.metrics import bootstrap_macro_auroc_ci, paired_bootstrap_macro_difference

    rng = np.random.default_rng(3)
    y = (rng.random((300, 3)) < 0.3).astype(float)
    y[:50, 1] = np.nan
    y[:, 2] = 0.0  # a task without positives is left out of the macro mean
    good = y + rng.normal(0, 0.8, y.shape)
    bad = y + rng.normal(0, 3.0, y.shape)
    macro = bootstrap_macro_auroc_ci(y, good, n_boot=200)
    expected = np.mean([auroc(y[:, t], good[:, t]) for t in (0, 1)])
    assert macro["auroc"] == pytest.approx(expected) and macro["n_tasks"] == 2
    assert macro["ci_low"] < macro["auroc"] < macro["ci_high"]
    diff = paired_bootstrap_macro_difference(y, good, bad, n_boot=200)
    assert diff["difference"] > 0 and diff["ci_low"] > 0


@pytest.mark.parametrize("ties", [False, True])
def test_resampled_auroc_from_draw_counts_equals_the_auroc_of_each_resample(ties):
    """The bootstrap's fast path (one matrix product over draw counts, and +inf ranks for unlabelled patients)
    gives, resample by resample, the AUROC scikit-learn gives on that resample's labelled patients."""
    from xcardia.metrics import _auroc_masked, _resampled_auroc, bootstrap_indices, resample_counts

    rng = np.random.default_rng(11)
    n = 70
    y = (rng.random(n) < 0.3).astype(float)
    y[rng.random(n) < 0.25] = np.nan
    s = rng.integers(0, 4, n).astype(float) if ties else rng.random(n)
    idx = bootstrap_indices(n, 60, seed=5)
    fast = _resampled_auroc(y, s, idx, resample_counts(idx, n))
    ranked = _auroc_masked(y[idx], s[idx])
    slow = np.array([auroc(y[i], s[i]) for i in idx])
    np.testing.assert_array_equal(fast, ranked)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert np.isfinite(fast).all()


def test_resampled_auroc_is_nan_when_a_drawn_labelled_patient_has_no_score():
    from xcardia.metrics import _resampled_auroc, resample_counts

    y = np.array([1.0, 0.0, 1.0, 0.0, np.nan])
    s = np.array([0.9, 0.1, np.nan, 0.2, 0.5])
    idx = np.array([[0, 1, 3, 3, 4], [0, 1, 2, 3, 4]])
    out = _resampled_auroc(y, s, idx, resample_counts(idx, 5))
    assert out[0] == 1.0 and np.isnan(out[1])
