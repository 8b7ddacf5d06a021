"""Early stopping on a validation score, the public fine-tuning rule (``Finetuning.py:592-616``)."""

from __future__ import annotations

import copy
import math


class EarlyStopping:
    """Early stopping on a validation score (higher is better), the public rule (``Finetuning.py:592-616``): an
    epoch improves when its score exceeds the best by more than ``min_delta``; training stops after ``patience``
    epochs without improvement, but not before ``min_epochs`` epochs.

    A NaN score (no validation task has both classes) carries no information: it never counts as an improvement
    and never advances the patience; while no finite score has been seen, the latest state is kept, so a run
    without any usable validation score ends with its last epoch. (The public code scores such an epoch 0.0.)

    Args:
        patience: epochs without improvement before stopping.
        min_delta: the margin an improvement must exceed.
        min_epochs: no stop before this many epochs.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, min_epochs: int = 0):
        self.patience = patience
        self.min_delta = min_delta
        self.min_epochs = min_epochs
        self.best = -math.inf
        self.best_state = None
        self.best_epoch = None
        self.stale = 0
        self.epochs = 0
        self.seen_finite = False

    def step(self, score: float, state) -> bool:
        """Record this epoch's ``score``; ``state()`` returns the weights to keep if it is the best. Returns True
        when training should stop."""
        self.epochs += 1
        if math.isnan(score):
            if not self.seen_finite:
                self.best_state = copy.deepcopy(state())
            return False
        if score > self.best + self.min_delta:
            self.best, self.stale, self.seen_finite, self.best_epoch = score, 0, True, self.epochs
            self.best_state = copy.deepcopy(state())
            return False
        self.stale += 1
        return self.stale >= self.patience and self.epochs >= self.min_epochs
