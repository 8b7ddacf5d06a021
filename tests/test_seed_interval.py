"""The two-level (pretraining seed × test patient) interval: coverage on simulated data where the truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from xcardia.metrics import paired_bootstrap_macro_difference, seed_aware_interval
from xcardia.reporting import ablation_verdict, seed_aware_tables

N_SEEDS, N_PATIENTS, PREVALENCE = 3, 200, 0.3
MU_A, MU_B, SEED_SD = 1.2, 1.0, 0.25  # separation of each method; spread of a method's separation over seeds


def _population_difference() -> float:
    """E over seeds of AUROC(a) − AUROC(b), scores = y·(μ + seed effect) + N(0, 1) noise → AUROC = Φ(sep/√2)."""
    z = np.random.default_rng(99).normal(size=200_000) * SEED_SD
    return float(np.mean(norm.cdf((MU_A + z) / np.sqrt(2)) - norm.cdf((MU_B + z) / np.sqrt(2))))


def _simulate(rng):
    y = (rng.random(N_PATIENTS) < PREVALENCE).astype(float)[:, None]
    shared = rng.normal(size=(N_PATIENTS, 1)) * 0.7  # a patient hard for one method is hard for the other
    arms = {}
    for mu, name in ((MU_A, "a"), (MU_B, "b")):
        arms[name] = [y * (mu + rng.normal() * SEED_SD) + shared + rng.normal(size=(N_PATIENTS, 1)) * np.sqrt(1 - 0.49)
                      for _ in range(N_SEEDS)]
    return y, arms["a"], arms["b"]


def test_seed_aware_interval_covers_the_population_difference_and_the_patient_only_one_does_not():
    truth = _population_difference()
    rng = np.random.default_rng(0)
    ours = patient_only = 0
    n_sims = 120
    for i in range(n_sims):
        y, a, b = _simulate(rng)
        r = seed_aware_interval(y, a, b, n_boot=150, seed=i)
        ours += r["ci_low"] <= truth <= r["ci_high"]
        p = paired_bootstrap_macro_difference(y, np.stack(a), np.stack(b), n_boot=150, seed=i)
        patient_only += p["ci_low"] <= truth <= p["ci_high"]
    assert ours / n_sims >= 0.90, ours / n_sims
    # ignoring the seed variance is what the two-level interval fixes: the patient-only interval under-covers
    assert patient_only / n_sims < ours / n_sims - 0.1, (patient_only / n_sims, ours / n_sims)


def test_seed_aware_interval_reports_per_seed_values_and_its_parts():
    rng = np.random.default_rng(1)
    y, a, b = _simulate(rng)
    r = seed_aware_interval(y, a, b, n_boot=100, seed=0)
    assert r["n_seeds"] == N_SEEDS and len(r["per_seed"]) == N_SEEDS
    assert np.isclose(r["estimate"], np.mean(r["per_seed"]))
    assert r["se_seed"] > 0 and r["se_patient"] > 0 and r["ci_low"] < r["estimate"] < r["ci_high"]


def test_one_seed_falls_back_to_the_patient_bootstrap_and_says_so():
    rng = np.random.default_rng(2)
    y, a, b = _simulate(rng)
    r = seed_aware_interval(y, a[:1], b[:1], n_boot=200, seed=0)
    assert r["n_seeds"] == 1 and np.isnan(r["se_seed"]) and r["ci_low"] < r["estimate"] < r["ci_high"]


# ------------------------------------------------------------------------------------------ single-seed ablations
@pytest.mark.parametrize("difference, low, high, reseed_sd, expected", [
    (0.05, 0.01, 0.09, 0.01, "better than the base"),          # interval above 0, |Δ| > 2 SD
    (-0.05, -0.09, -0.01, 0.01, "worse than the base"),
    (0.05, 0.01, 0.09, 0.03, "not distinguishable from reseeding"),  # interval above 0 but |Δ| ≤ 2 SD
    (0.05, -0.01, 0.11, 0.001, "not distinguishable from reseeding"),  # interval includes 0
    (0.05, 0.01, 0.09, math.nan, "no reseeding scale (the base has one seed)"),
    (math.nan, math.nan, math.nan, 0.01, "not measurable on this cohort"),
])
def test_ablation_verdict_needs_a_patient_interval_off_zero_and_more_than_twice_the_reseeding_sd(
        difference, low, high, reseed_sd, expected):
    assert ablation_verdict(difference, low, high, reseed_sd) == expected


def test_an_ablation_is_paired_with_the_base_at_its_own_seed_and_scaled_by_the_bases_seed_spread():
    """A planted strong ablation at seed 0 beats xcardia_fixed_s0 (not s1/s2), with the base's SD as scale."""
    rng = np.random.default_rng(3)
    n = 400
    y = (rng.random(n) < 0.3).astype(float)[:, None]
    noise = lambda: rng.normal(size=(n, 1))  # noqa: E731
    scores = {f"xcardia_fixed_s{k}": y * (0.8 + 0.05 * k) + noise() for k in range(3)}
    scores["xcardia_fixed_lambda1_s0"] = y * 2.5 + noise()
    scores["clip_s0"] = y * 0.8 + noise()
    tables = seed_aware_tables(y, lambda name: scores[name][None], list(scores), n_boot=200, seed=0)
    (row,) = tables["ablations"]
    assert row["ablation"] == "xcardia_fixed_lambda1_s0" and row["against"] == "xcardia_fixed_s0"
    base = next(m for m in tables["methods"] if m["method"] == "xcardia_fixed")
    assert row["reseed_sd"] == pytest.approx(float(np.std(base["per_seed"], ddof=1)))
    assert row["ci_low"] > 0 and row["verdict"] == "better than the base"


# ------------------------------------------------------------------------------------------ issue 19.4: coverage
def _old_interval(per_seed: np.ndarray, boots: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The interval before issue 19: t(S − 1) on sqrt(Var_s/S + Var_b(seed mean)) (interaction counted twice)."""
    from scipy import stats

    s = per_seed.size
    se = math.sqrt(per_seed.var(ddof=1) / s + boots.mean(axis=0).var(ddof=1))
    half = stats.t.ppf(1 - alpha / 2, s - 1) * se
    return per_seed.mean() - half, per_seed.mean() + half


#: (seed SD, per-patient SD, seed × patient SD, few-shot draw SD): one seed's value is the mean over patients and
#: draws of x[s, d, i] = a_s + g_{s,d} + p_i + e_{s,i}; truth 0.
REGIMES = {
    "seed-dominant": (0.030, 0.20, 0.20, 0.010),
    "patient-dominant": (0.003, 1.00, 0.30, 0.005),
    "balanced": (0.015, 0.40, 0.30, 0.015),
}


def _simulate_levels(rng, sd_seed, sd_patient, sd_interaction, sd_draw, shared_draws: bool, n_seeds=3, n_draws=5,
                     n_patients=400, n_boot=300):
    a = rng.normal(size=(n_seeds, 1)) * sd_seed
    g = rng.normal(size=(1 if shared_draws else n_seeds, n_draws)) * sd_draw  # the draw effect of each k-shot subset
    x = a + g.mean(axis=1, keepdims=True) + rng.normal(size=(1, n_patients)) * sd_patient \
        + rng.normal(size=(n_seeds, n_patients)) * sd_interaction  # (S, n): per seed, per patient
    idx = rng.integers(0, n_patients, size=(n_boot, n_patients))
    return x.mean(axis=1), x[:, idx].mean(axis=2)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_two_level_interval_has_nominal_coverage_in_every_regime_and_the_old_one_did_not(regime):
    from xcardia.metrics import two_level_interval

    rng = np.random.default_rng(list(REGIMES).index(regime))
    n_sims = 1500
    new_cover = old_cover = shared_cover = 0
    new_width, old_width = [], []
    for _ in range(n_sims):
        per_seed, boots = _simulate_levels(rng, *REGIMES[regime], shared_draws=False)
        r = two_level_interval(per_seed, boots)
        new_cover += r["ci_low"] <= 0 <= r["ci_high"]
        new_width.append(r["ci_high"] - r["ci_low"])
        lo, hi = _old_interval(per_seed, boots)
        old_cover += lo <= 0 <= hi
        old_width.append(hi - lo)
        per_seed, boots = _simulate_levels(rng, *REGIMES[regime], shared_draws=True)
        r = two_level_interval(per_seed, boots)  # the draws shared by every seed: their variance is invisible
        shared_cover += r["ci_low"] <= 0 <= r["ci_high"]
    coverage, old = new_cover / n_sims, old_cover / n_sims
    ratio = float(np.median(old_width) / np.median(new_width))
    print(f"{regime}: coverage {coverage:.3f} (old {old:.3f}, draws shared {shared_cover / n_sims:.3f}); "
          f"old/new width {ratio:.2f}")
    assert 0.92 <= coverage <= 0.98, coverage
    assert old >= coverage and ratio > 1.0  # the old interval was wider, never narrower


def test_draws_shared_by_every_seed_leave_their_variance_out_of_the_interval():
    """When few-shot draws dominate and every seed reuses the same draws, nothing in the data shows their variance:
    coverage falls well below nominal. Draws that differ per seed (what run_kshot does) restore it."""
    from xcardia.metrics import two_level_interval

    rng = np.random.default_rng(7)
    levels = (0.005, 0.2, 0.1, 0.05)
    cover = {True: 0, False: 0}
    for _ in range(800):
        for shared in (True, False):
            per_seed, boots = _simulate_levels(rng, *levels, shared_draws=shared)
            r = two_level_interval(per_seed, boots)
            cover[shared] += r["ci_low"] <= 0 <= r["ci_high"]
    assert cover[True] / 800 < 0.85 and 0.92 <= cover[False] / 800 <= 0.98, cover


def test_seed_aware_interval_is_the_two_level_interval_of_the_per_seed_macro_aurocs():
    from xcardia.metrics import _macro_boots, bootstrap_indices, two_level_interval

    rng = np.random.default_rng(3)
    y, a, b = _simulate(rng)
    r = seed_aware_interval(y, a, b, n_boot=100, seed=5)
    idx = bootstrap_indices(len(y), 100, 5)
    per, boots = [], []
    for x, z in zip(a, b):
        pa, ba, _ = _macro_boots(y, x[None], idx)
        pb, bb, _ = _macro_boots(y, z[None], idx)
        per.append(pa - pb)
        boots.append(ba - bb)
    expected = two_level_interval(np.array(per), np.stack(boots), bounds=(-1, 1))
    assert r["ci_low"] == pytest.approx(expected["ci_low"]) and r["ci_high"] == pytest.approx(expected["ci_high"])
    assert r["df"] == pytest.approx(expected["df"]) and r["df"] >= N_SEEDS - 1
