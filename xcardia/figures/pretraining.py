"""Figures of notebook 02: training curves, temperatures, validation concept metrics, support-bank exemplars."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from xcardia.schema import CONCEPT_NAMES
from xcardia.figures import radiological_slices, window_limits


def _per_epoch(logs: dict[str, pd.DataFrame], panels: list[tuple[str, str]], log_y: bool = False):
    """One panel per (log column, title), one line per run against the epoch."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (column, title) in zip(axes.flat, panels):
        for name, log in logs.items():
            if column in log and log[column].notna().any() and not (log[column] == 0).all():  # a loss a run never uses
                ax.plot(log["epoch"], log[column], marker="o", ms=3, label=name)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training_curves(logs: dict[str, pd.DataFrame]):
    """Per run: total training loss, its CLIP and NW parts, and the validation CLIP loss per epoch."""
    return _per_epoch(logs, [("train_loss", "training loss"), ("train_clip", "CLIP loss (train)"),
                             ("train_nw", "NW loss (train)"), ("val_clip", "CLIP loss (validation)")])


def plot_temperatures(logs: dict[str, pd.DataFrame]):
    """CLIP and NW temperatures per epoch (flat lines where they are fixed)."""
    return _per_epoch(logs, [("clip_temperature", "clip temperature"), ("nw_temperature", "nw temperature")], log_y=True)


def plot_concept_metrics(logs: dict[str, pd.DataFrame]):
    """Validation concept AUROC and ECE of the NW head per epoch."""
    fig = _per_epoch(logs, [("val_concept_auroc", "validation concept AUROC (NW)"),
                            ("val_concept_ece", "validation concept ECE (NW)")])
    fig.axes[0].axhline(0.5, color="0.7", lw=0.8, ls="--")
    return fig


def plot_bank_exemplars(volumes: list[np.ndarray], concepts: pd.DataFrame, max_columns: int = 10):
    """Axial slice through the middle of each exemplar's CT, titled with its abnormal concepts."""
    n = min(len(volumes), max_columns * 2)
    cols = min(n, max_columns)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False)
    lo, hi = window_limits("mediastinal")
    short = {c: c.replace("concept_", "").replace("_abnormal", "") for c in CONCEPT_NAMES}
    for ax in axes.flat:
        ax.axis("off")
    for ax, volume, (_, row) in zip(axes.flat, volumes[:n], concepts.iloc[:n].iterrows()):
        centre = tuple(s // 2 for s in volume.shape)
        ax.imshow(radiological_slices(volume, centre)["axial"], cmap="gray", vmin=lo, vmax=hi)
        abnormal = [short[c] for c in CONCEPT_NAMES if row[c] == 1]
        ax.set_title(", ".join(abnormal) or "none abnormal", fontsize=7)
    fig.tight_layout()
    return fig
