"""The two-level (pretraining seed × test patient) interval: coverage on simulated data where the truth is known."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from xcardia.metrics import paired_bootstrap_macro_difference, seed_aware_interval

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
