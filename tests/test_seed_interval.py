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
