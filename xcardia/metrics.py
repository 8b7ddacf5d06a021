"""Metrics, in one place: AUROC/AUPRC on labelled patients (missing labels left out), calibration (ECE), and
bootstrap confidence intervals resampling patients.

AUROC and AUPRC come from scikit-learn; this module adds the masking, the macro means and the intervals.
"""

from __future__ import annotations

import math

import numpy as np


def _labelled(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(y_score, dtype=float)
    keep = ~(np.isnan(y) | np.isnan(s))
    return y[keep], s[keep]


def auroc(y_true, y_score) -> float:
    """AUROC over patients with a label and a score; NaN when either class is absent."""
    from sklearn.metrics import roc_auc_score

    y, s = _labelled(y_true, y_score)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def auprc(y_true, y_score) -> float:
    """Average precision (area under the precision–recall curve); NaN when either class is absent."""
    from sklearn.metrics import average_precision_score

    y, s = _labelled(y_true, y_score)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(average_precision_score(y, s))


def expected_calibration_error(y_true, probability, n_bins: int = 10) -> float:
    """ECE: Σ_bins (n_bin / n) · |mean(y) − mean(p)| over equal-width probability bins [0, 0.1), …, [0.9, 1].

    (Guo et al., ICML 2017.) Unlabelled entries are left out; NaN if none remain.
    """
    y, p = _labelled(y_true, probability)
    if y.size == 0:
        return math.nan
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.sum() / y.size * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(total)


def nanmean(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


# ------------------------------------------------------------------------------------------ bootstrap intervals
def auroc_many(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` (R, n) against ``y_true`` (R, n) of 0/1, by the rank-sum (Mann–Whitney)
    formula with mid-ranks for ties; NaN for a row without both classes. Vectorised for bootstrap resamples."""
    from scipy.stats import rankdata

    y = np.asarray(y_true, dtype=float)
    ranks = rankdata(np.asarray(scores, dtype=float), axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) patient indices resampled with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_auroc_ci(y_true, scores, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUROC with a percentile bootstrap CI resampling patients.

    Args:
        y_true: (n,) labels with NaN for unlabelled patients (left out).
        scores: (n,) scores, or (S, n) scores of S runs (e.g. fine-tuning seeds), whose AUROCs are averaged.
        n_boot, seed, alpha: resamples, their seed, 1 − confidence.

    Returns:
        ``{"auroc", "ci_low", "ci_high", "n_pos", "n_neg"}``; NaNs when a class is absent.
    """
    y = np.asarray(y_true, dtype=float)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out = {"auroc": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_pos": n_pos, "n_neg": n_neg}
    keep = ~np.isnan(y) & ~np.isnan(s).any(axis=0)
    y, s = y[keep], s[:, keep]
    if (y == 1).sum() == 0 or (y == 0).sum() == 0:
        return out
    out["auroc"] = float(np.mean(auroc_many(np.broadcast_to(y, s.shape), s)))
    idx = bootstrap_indices(len(y), n_boot, seed)
    boots = np.mean([auroc_many(y[idx], run[idx]) for run in s], axis=0)
    boots = boots[~np.isnan(boots)]
    if boots.size:
        out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(boots, [alpha / 2, 1 - alpha / 2]))
    return out


def paired_bootstrap_difference(y_true, scores_a, scores_b, n_boot: int = 1000, seed: int = 0,
                                alpha: float = 0.05) -> dict:
    """AUROC(a) − AUROC(b) on the same patients, with a percentile CI from paired patient resamples.

    ``scores_a``/``scores_b`` are (n,) or (S, n) (runs averaged). Returns ``{"difference", "ci_low", "ci_high"}``.
    """
    y = np.asarray(y_true, dtype=float)
    a = np.atleast_2d(np.asarray(scores_a, dtype=float))
    b = np.atleast_2d(np.asarray(scores_b, dtype=float))
    keep = ~np.isnan(y) & ~np.isnan(a).any(axis=0) & ~np.isnan(b).any(axis=0)
    y, a, b = y[keep], a[:, keep], b[:, keep]
    out = {"difference": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if (y == 1).sum() == 0 or (y == 0).sum() == 0:
        return out

    def mean_auroc(runs, labels):
        return np.mean([auroc_many(labels, np.atleast_2d(r)) for r in runs], axis=0)

    out["difference"] = float((mean_auroc(a, y[None]) - mean_auroc(b, y[None]))[0])
    idx = bootstrap_indices(len(y), n_boot, seed)
    diffs = mean_auroc([r[idx] for r in a], y[idx]) - mean_auroc([r[idx] for r in b], y[idx])
    diffs = diffs[~np.isnan(diffs)]
    if diffs.size:
        out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(diffs, [alpha / 2, 1 - alpha / 2]))
    return out


def mean_ci(values, alpha: float = 0.05, bounds: tuple[float, float] | None = None) -> dict:
    """Mean and a t-interval over independent repeats (e.g. few-shot seeds); NaNs are left out. ``bounds`` clips
    the interval to the quantity's range (e.g. (0, 1) for an AUROC)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    out = {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": int(v.size)}
    if v.size == 0:
        return out
    out["mean"] = float(v.mean())
    if v.size > 1:
        half = stats.t.ppf(1 - alpha / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
        if bounds is not None:
            out["ci_low"], out["ci_high"] = max(out["ci_low"], bounds[0]), min(out["ci_high"], bounds[1])
    return out


def _macro_boots(y: np.ndarray, s: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Macro AUROC of runs ``s`` (S, n, T) and its value on each bootstrap resample ``idx`` (B, n)."""
    point, boots = [], []
    counts = resample_counts(idx, y.shape[0])
    for t in range(y.shape[1]):
        keep = ~np.isnan(y[:, t])
        if (y[keep, t] == 1).sum() == 0 or (y[keep, t] == 0).sum() == 0 or np.isnan(s[:, :, t]).all():
            continue  # a task without both classes in test, or without any score, is left out of the macro mean
        point.append(np.mean([auroc(y[:, t], run[:, t]) for run in s]))
        boots.append(np.mean([_resampled_auroc(y[:, t], run[:, t], idx, counts) for run in s], axis=0))
    if not point:
        return math.nan, np.full(idx.shape[0], np.nan), 0
    # the mean over tasks scorable in each resample (np.nanmean's arithmetic, without its warning for a resample
    # where no task has both classes: that resample's macro is NaN and the interval leaves it out)
    stacked = np.stack(boots)
    valid = ~np.isnan(stacked)
    counted = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_means = np.where(counted > 0, np.where(valid, stacked, 0.0).sum(axis=0) / counted, np.nan)
    return float(np.mean(point)), boot_means, len(point)


def bootstrap_macro_auroc_ci(y_true: np.ndarray, scores, n_boot: int = 1000, seed: int = 0,
                             alpha: float = 0.05) -> dict:
    """Macro AUROC (mean over tasks that have both classes) with a patient-bootstrap CI.

    Args:
        y_true: (n, T) labels with NaN for unlabelled (left out task by task).
        scores: (n, T) or (S, n, T) — runs are averaged per task before the macro mean.
    """
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(scores, dtype=float)
    s = s[None] if s.ndim == 2 else s
    point, boots, n_tasks = _macro_boots(y, s, bootstrap_indices(y.shape[0], n_boot, seed))
    out = {"auroc": point, "ci_low": math.nan, "ci_high": math.nan, "n_tasks": n_tasks}
    if n_tasks:
        out["ci_low"], out["ci_high"] = (float(v) for v in np.nanquantile(boots, [alpha / 2, 1 - alpha / 2]))
    return out


def paired_bootstrap_macro_difference(y_true: np.ndarray, scores_a, scores_b, n_boot: int = 1000, seed: int = 0,
                                      alpha: float = 0.05) -> dict:
    """Macro AUROC(a) − macro AUROC(b) on the same patients, CI from paired patient resamples."""
    y = np.asarray(y_true, dtype=float)
    a, b = (np.asarray(x, dtype=float) for x in (scores_a, scores_b))
    a, b = (x[None] if x.ndim == 2 else x for x in (a, b))
    idx = bootstrap_indices(y.shape[0], n_boot, seed)
    pa, ba, _ = _macro_boots(y, a, idx)
    pb, bb, _ = _macro_boots(y, b, idx)
    diffs = ba - bb
    out = {"difference": pa - pb, "ci_low": math.nan, "ci_high": math.nan}
    if np.isfinite(diffs).any():
        out["ci_low"], out["ci_high"] = (float(v) for v in np.nanquantile(diffs, [alpha / 2, 1 - alpha / 2]))
    return out


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, n) how often each patient appears in each bootstrap resample ``idx`` (B, n)."""
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    return np.bincount(rows * n + idx.ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n).astype(float)


def _resampled_auroc(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of one task on every bootstrap resample, from how often each patient was drawn.

    A resample's Mann–Whitney U is Σ_{i pos, j neg} c_i c_j (1[s_i > s_j] + ½ 1[s_i = s_j]) with c the draw counts,
    so all B resamples are one (B, P)·(P, N)·(N, B) product over the labelled patients instead of B rankings;
    U and the class counts are sums of halves and integers, so the result is the same number
    :func:`_auroc_masked` gives on ``labels[idx]``, ``scores[idx]`` (checked in ``tests/test_metrics.py``). A NaN
    score among labelled patients takes the ranking path, which gives NaN wherever such a patient was drawn.
    """
    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    labelled = ~np.isnan(labels)
    if np.isnan(scores[labelled]).any():
        return _auroc_masked(labels[idx], scores[idx])
    pos, neg = labelled & (labels == 1), labelled & (labels == 0)
    sp, sn = scores[pos], scores[neg]
    kernel = (sp[:, None] > sn[None, :]).astype(float) + 0.5 * (sp[:, None] == sn[None, :])
    cp, cn = counts[:, pos], counts[:, neg]
    u = np.einsum("bj,bj->b", cp @ kernel, cn)
    n_pos, n_neg = cp.sum(axis=1), cn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _auroc_masked(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row-wise AUROC where NaN labels are left out, vectorised over rows (bootstrap resamples).

    An unlabelled patient's score is set to +inf before ranking, so it ranks after every labelled one and leaves
    their mid-ranks exactly as if it had been removed; its label counts as neither class. The result equals
    :func:`auroc_many` on each row's labelled patients (``tests/test_metrics.py`` checks it row by row); a NaN
    score among labelled patients gives NaN, as before.
    """
    from scipy.stats import rankdata

    labels = np.asarray(labels, dtype=float)
    missing = np.isnan(labels)
    if not missing.any():
        return auroc_many(labels, scores)
    ranks = rankdata(np.where(missing, np.inf, np.asarray(scores, dtype=float)), axis=1)
    y = np.where(missing, 0.0, labels)
    n_pos = y.sum(axis=1)
    n_neg = (~missing).sum(axis=1) - n_pos
    u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def two_level_interval(per_seed: np.ndarray, boots: np.ndarray, alpha: float = 0.05,
                       bounds: tuple[float, float] | None = None) -> dict:
    """Mean over pretraining seeds of a quantity measured on one fixed test set, with an interval for both levels
    of sampling: seeds (pretraining, fine-tuning, few-shot draws) and test patients.

    With S seeds, values v_s and, for B patient resamples shared by all seeds, the recomputed values v_s^(b):

        se_seed²   = Var_s(v_s) / S                      (seeds, plus each seed's own seed × patient term),
        D_s^(b)    = v_s^(b) − v_s,   M^(b) = mean_s D_s^(b),
        σ_int²     = S/(S−1) · mean_s Var_b(D_s^(b) − M^(b))   (the seed × patient interaction),
        se_patient² = max(Var_b(M^(b)) − σ_int² / S, 0)   (patients alone: the interaction is already in se_seed),
        SE² = se_seed² + se_patient²,   ν = SE⁴ · (S − 1) / se_seed⁴    (Satterthwaite; the patient part has
                                                                        effectively infinite degrees of freedom),
        half-width = max(t_{1−α/2, ν} · SE,  t_{1−α/2, S−1} · se_seed),   interval = mean_s v_s ± half-width.

    The second term keeps the interval from being narrower than the seed level's own t interval: with S = 3 the
    estimated ν is biased upwards whenever se_seed² happens to come out small, and Satterthwaite alone covers
    0.926–0.947 on simulated data with seed:patient variance ratios from 10:1 to 1:10 (3,000 simulations each);
    with the floor, 0.94–0.953.
    Welch (1947), Satterthwaite (1946). The previous interval used t with S − 1 degrees of freedom on the whole SE
    and kept the interaction in both terms: about twice as wide, coverage ≈ 1.00 at nominal 0.95
    (``tests/test_seed_interval.py`` simulates both). With one seed: the percentile patient-bootstrap interval.

    Args:
        per_seed: (S,) v_s.
        boots: (S, B) v_s^(b); non-finite resamples are left out.
        alpha: 1 − confidence.
        bounds: the quantity's range to clip the interval to.

    Returns:
        ``{"estimate", "ci_low", "ci_high", "se_seed", "se_patient", "df"}``.
    """
    from scipy import stats

    v = np.asarray(per_seed, dtype=float)
    b = np.asarray(boots, dtype=float)
    b = b[:, np.isfinite(b).all(axis=0)]
    out = {"estimate": float(v.mean()) if v.size else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "se_seed": math.nan, "se_patient": math.nan, "df": math.nan}
    if not v.size or np.isnan(v).any():
        out["estimate"] = math.nan
        return out
    if v.size == 1:
        if b.shape[1]:
            out["ci_low"], out["ci_high"] = (float(x) for x in np.quantile(b[0], [alpha / 2, 1 - alpha / 2]))
        return out
    s = v.size
    se_seed2 = float(v.var(ddof=1) / s)
    if b.shape[1] > 1:
        dev = b - v[:, None]
        m = dev.mean(axis=0)
        interaction = s / (s - 1) * float(np.mean((dev - m).var(axis=1, ddof=1)))
        se_patient2 = max(float(m.var(ddof=1)) - interaction / s, 0.0)
    else:
        se_patient2 = 0.0
    se2 = se_seed2 + se_patient2
    df = math.inf if se_seed2 == 0 else se2 ** 2 * (s - 1) / se_seed2 ** 2
    half = float(stats.t.ppf(1 - alpha / 2, df) if math.isfinite(df) else stats.norm.ppf(1 - alpha / 2)) * math.sqrt(se2)
    half = max(half, float(stats.t.ppf(1 - alpha / 2, s - 1)) * math.sqrt(se2 - se_patient2))
    low, high = out["estimate"] - half, out["estimate"] + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    out.update(ci_low=low, ci_high=high, se_seed=math.sqrt(se_seed2), se_patient=math.sqrt(se_patient2), df=df)
    return out


def seed_aware_interval(y_true: np.ndarray, scores_a: list, scores_b: list | None = None, n_boot: int = 1000,
                        seed: int = 0, alpha: float = 0.05) -> dict:
    """Macro AUROC (or, with ``scores_b``, the paired difference a − b) over pretraining seeds, with an interval
    that includes the seed-to-seed variance as well as the test patients' (:func:`two_level_interval`).

    Each element of ``scores_a`` (and ``scores_b``, paired by position: same seed offset, same fine-tuning subsets
    and k-shot draws) is one pretraining seed's runs, (R, n, T) or (n, T). Per seed the macro value v_s (or
    difference d_s) is computed on the same test patients, and on every patient resample (the same resample for every
    seed and both arms). k-shot draws differ between seeds (:func:`xcardia.finetune.kshot_draw_seed`), so the seed
    level carries the variance of which patients were drawn. With one seed it falls back to the patient bootstrap
    (``n_seeds`` = 1 says so).

    Returns:
        ``{"estimate", "ci_low", "ci_high", "n_seeds", "per_seed", "se_seed", "se_patient", "df", "n_tasks"}``.
    """
    y = np.asarray(y_true, dtype=float)
    idx = bootstrap_indices(y.shape[0], n_boot, seed)
    per_seed, boots, n_tasks = [], [], 0
    arms = list(zip(scores_a, scores_b)) if scores_b is not None else [(a, None) for a in scores_a]
    for a, b in arms:
        a = np.asarray(a, dtype=float)
        a = a[None] if a.ndim == 2 else a
        pa, ba, n_tasks = _macro_boots(y, a, idx)
        if b is not None:
            b = np.asarray(b, dtype=float)
            b = b[None] if b.ndim == 2 else b
            pb, bb, _ = _macro_boots(y, b, idx)
            pa, ba = pa - pb, ba - bb
        per_seed.append(pa)
        boots.append(ba)
    bounds = (-1.0, 1.0) if scores_b is not None else (0.0, 1.0)  # the quantity's range
    result = two_level_interval(np.asarray(per_seed, dtype=float),
                                np.stack(boots) if boots else np.zeros((0, 0)), alpha, bounds)
    return {**result, "n_seeds": len(per_seed), "per_seed": [float(v) for v in per_seed], "n_tasks": n_tasks}


def concept_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict:
    """Per-concept and mean AUROC, AUPRC (mAP) and ECE of NW concept predictions (masked where missing).

    Args:
        predictions: (N, C) probabilities (NaN where no support observed the concept).
        targets: (N, C) 1, 0 or NaN, columns in :data:`xcardia.schema.CONCEPT_NAMES` order.
    """
    from xcardia.schema import CONCEPT_NAMES

    out = {}
    for c, name in enumerate(CONCEPT_NAMES):
        out[f"{name}_auroc"] = auroc(targets[:, c], predictions[:, c])
        out[f"{name}_auprc"] = auprc(targets[:, c], predictions[:, c])
        out[f"{name}_ece"] = expected_calibration_error(targets[:, c], predictions[:, c])
    out["concept_auroc"] = nanmean([out[f"{n}_auroc"] for n in CONCEPT_NAMES])
    out["concept_map"] = nanmean([out[f"{n}_auprc"] for n in CONCEPT_NAMES])
    out["concept_ece"] = nanmean([out[f"{n}_ece"] for n in CONCEPT_NAMES])
    return out


def masked_bce(targets: np.ndarray, predictions: np.ndarray, eps: float = 1e-6) -> float:
    """Mean binary cross-entropy over the observed entries (target and prediction both present), probabilities
    clipped to [eps, 1 − eps]. Computed in the inputs' precision (float32 NW predictions stay float32)."""
    y, p = np.asarray(targets), np.asarray(predictions)
    observed = ~np.isnan(y) & ~np.isnan(p)
    clipped = np.clip(p[observed], eps, 1 - eps)
    return float(-np.mean(y[observed] * np.log(clipped) + (1 - y[observed]) * np.log(1 - clipped)))


# ------------------------------------------------------------------------------------------ screening (issue 20)
def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927); NaNs when n = 0."""
    from scipy.stats import norm

    if n == 0:
        return math.nan, math.nan
    z = float(norm.ppf(1 - alpha / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def diagnostic_at_threshold(y_true, score, threshold: float) -> dict:
    """Sensitivity, specificity, PPV and NPV of ``score ≥ threshold`` on labelled patients, each with a Wilson
    95 % interval and its counts."""
    y, s = _labelled(y_true, score)
    flag = s >= threshold
    tp, fp = int((flag & (y == 1)).sum()), int((flag & (y == 0)).sum())
    fn, tn = int((~flag & (y == 1)).sum()), int((~flag & (y == 0)).sum())
    out = {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp),
                       ("npv", tn, tn + fn)):
        out[name] = k / n if n else math.nan
        out[f"{name}_low"], out[f"{name}_high"] = wilson_interval(k, n)
    return out


def ppv_at_prevalence(sensitivity: float, specificity: float, prevalence: float) -> float:
    """Positive predictive value at another prevalence (Bayes): sens·π / (sens·π + (1 − spec)·(1 − π))."""
    denominator = sensitivity * prevalence + (1 - specificity) * (1 - prevalence)
    return sensitivity * prevalence / denominator if denominator > 0 else math.nan


def net_benefit(y_true, probability, thresholds) -> dict:
    """Decision-curve analysis (Vickers & Elkin, Med Decis Making 2006): net benefit of flagging patients with
    probability ≥ t, TP/n − FP/n · t/(1 − t), for the model and for flagging everyone, at each threshold t."""
    y, p = _labelled(y_true, probability)
    n = y.size
    thresholds = np.asarray(thresholds, dtype=float)
    model, everyone = [], []
    prevalence = y.mean() if n else math.nan
    for t in thresholds:
        odds = t / (1 - t)
        flag = p >= t
        model.append(((flag & (y == 1)).sum() - (flag & (y == 0)).sum() * odds) / n if n else math.nan)
        everyone.append(prevalence - (1 - prevalence) * odds)
    return {"threshold": thresholds, "model": np.asarray(model, dtype=float), "treat_all": np.asarray(everyone)}
