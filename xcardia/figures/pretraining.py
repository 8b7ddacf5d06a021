"""Figures of notebook 02: training curves, temperatures, validation concept metrics, support-bank exemplars."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from xcardia.cohort.schema import CONCEPT_NAMES
from xcardia.figures import radiological_slices, window_limits


def plot_training_curves(logs: dict[str, pd.DataFrame]):
    """Per run: total training loss, its CLIP and NW parts, and the validation CLIP loss per epoch."""
    panels = [("train_loss", "training loss"), ("train_clip", "CLIP loss (train)"), ("train_nw", "NW loss (train)"),
              ("val_clip", "CLIP loss (validation)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (column, title) in zip(axes, panels):
        for name, log in logs.items():
            if column in log and log[column].abs().sum() > 0:
                ax.plot(log["epoch"], log[column], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_temperatures(logs: dict[str, pd.DataFrame]):
    """CLIP and NW temperatures per epoch (flat lines where they are fixed)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, column in zip(axes, ("clip_temperature", "nw_temperature")):
        for name, log in logs.items():
            ax.plot(log["epoch"], log[column], marker="o", ms=3, label=name)
        ax.set_yscale("log")
        ax.set_title(column.replace("_", " "), fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_concept_metrics(logs: dict[str, pd.DataFrame]):
    """Validation concept AUROC and ECE of the NW head per epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (column, title) in zip(axes, (("val_concept_auroc", "validation concept AUROC (NW)"),
                                          ("val_concept_ece", "validation concept ECE (NW)"))):
        for name, log in logs.items():
            if column in log:
                ax.plot(log["epoch"], log[column], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].axhline(0.5, color="0.7", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
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
