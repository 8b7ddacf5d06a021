"""The linear probe: a logistic regression per task on the frozen encoder's 128-d features (scikit-learn)."""

from __future__ import annotations

import numpy as np


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float) -> np.ndarray:
    """Probability of the positive class from an L2 logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = ~np.isnan(train_y)
    if len(np.unique(train_y[keep])) < 2:
        return np.full(len(test_x), np.nan)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
    model.fit(train_x[keep], train_y[keep].astype(int))
    return model.predict_proba(test_x)[:, 1]
