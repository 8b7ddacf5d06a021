"""Which training patients a downstream run sees: the public label-fraction draw and true k-shot draws.

The fraction draw is the public sweep's (``Finetuning.py:351-358``); k-shot has no public counterpart (register D9):
k positives and k negatives per task, the draws of pretraining seed K their own (:func:`kshot_draw_seed`), the same
for every init of that seed so paired differences stay paired.
"""

from __future__ import annotations

import math

import numpy as np


def fraction_subset(train_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A random ``fraction`` of the training rows (at least one), drawn as the public sweep draws them
    (``Finetuning.py:351-358``: ``RandomState(seed + round(1000·fraction))``, ``floor(fraction · n)`` rows)."""
    n = max(1, int(math.floor(fraction * len(train_rows))))
    rng = np.random.RandomState(seed + int(round(fraction * 1000)))
    return np.sort(np.asarray(train_rows)[rng.choice(len(train_rows), size=n, replace=False)])


def labelled_rows(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows with at least one task label (the public code drops the others first, ``Finetuning.py:279-287``)."""
    return rows[~np.isnan(labels[rows]).all(axis=1)]


#: k-shot draw seeds of pretraining seed K are ``draw + KSHOT_SEED_STRIDE · K`` (draws differ between seeds).
KSHOT_SEED_STRIDE = 1000


def kshot_draw_seed(draw: int, seed_offset: int) -> int:
    return int(draw) + KSHOT_SEED_STRIDE * int(seed_offset)


def kshot_subset(labels: np.ndarray, train_rows: np.ndarray, task_index: int, k: int, seed: int) -> tuple[np.ndarray | None, str | None]:
    """k positives and k negatives of task ``task_index`` drawn from the labelled training rows.

    Returns ``(rows, None)``, or ``(None, reason)`` when fewer than k positives or negatives exist — the caller
    records the reason; nothing is skipped silently. The draw depends only on (seed, task, k), so every init gets
    the same patients.
    """
    y = labels[train_rows, task_index]
    pos, neg = train_rows[y == 1], train_rows[y == 0]
    if len(pos) < k or len(neg) < k:
        return None, (f"only {len(pos)} positive(s) and {len(neg)} negative(s) labelled in the training split; "
                      f"k={k} needs {k} of each")
    rng = np.random.default_rng([seed, task_index, k])
    return np.sort(np.r_[rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]), None
