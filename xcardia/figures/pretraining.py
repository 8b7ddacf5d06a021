"""Figures of notebook 02: training curves, temperatures, validation concept metrics, support-bank exemplars."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
import pandas as pd

from xcardia.schema import CONCEPT_NAMES
from xcardia.figures import method_colour, radiological_slices, window_limits


#: markers and line styles cycled per run, so that runs drawn on top of each other stay visible
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


def _legend_below(fig, axes) -> None:
    """One legend for the whole figure, under the panels, so that it never covers a line."""
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if not labels:
        fig.tight_layout()
        return
    ncol = min(len(labels), 3)
    rows = -(-len(labels) // ncol)
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, min(0.28 * rows / height, 0.45), 1, 1))


def _per_epoch(logs: dict[str, pd.DataFrame], panels: list[tuple[str, str]], log_y: bool = False, columns: int = 2):
    """One panel per (log column, title), one line per run against the epoch; at most ``columns`` panels a row so
    the figure reads at 100 % in a ~1,100 px notebook column."""
    n_cols = min(len(panels), columns)
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.0 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (column, title) in zip(axes.flat, panels):
        for i, (name, log) in enumerate(logs.items()):
            if column in log and log[column].notna().any() and not (log[column] == 0).all():  # a loss a run never uses
                ax.plot(log["epoch"], log[column], marker=MARKERS[i % len(MARKERS)], ms=4, label=name,
                        color=method_colour(name), ls=LINESTYLES[i % len(LINESTYLES)], alpha=0.9)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.tick_params(labelsize=9)
    _legend_below(fig, axes)
    return fig


def plot_training_curves(logs: dict[str, pd.DataFrame]):
    """Per run: total training loss, its CLIP and NW parts, and the validation CLIP loss per epoch."""
    return _per_epoch(logs, [("train_loss", "training loss"), ("train_clip", "CLIP loss (train)"),
                             ("train_nw", "NW loss (train)"), ("val_clip", "CLIP loss (validation)")])


def plot_temperatures(logs: dict[str, pd.DataFrame]):
    """CLIP and NW temperatures per epoch (flat lines where they are fixed), on a log axis with labelled ticks; runs
    whose temperature is identical are drawn once, named together."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.0))
    for ax, column, title in ((axes[0], "clip_temperature", "CLIP temperature τ"), (axes[1], "nw_temperature", "NW temperature τ")):
        for i, (name, log) in enumerate(_merge_identical(logs, column).items()):
            if column in log and log[column].notna().any():
                ax.plot(log["epoch"], log[column], marker=MARKERS[i % len(MARKERS)], ms=4, label=name,
                        color=method_colour(name.split(" = ")[0]), ls=LINESTYLES[i % len(LINESTYLES)], alpha=0.9)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.3), frameon=False)
    fig.tight_layout()
    return fig


def _merge_identical(logs: dict[str, pd.DataFrame], column: str) -> dict[str, pd.DataFrame]:
    """Runs with the same curve of ``column`` under one joined name (three identical lines read as one)."""
    groups: dict[tuple, list[str]] = {}
    for name, log in logs.items():
        if column in log:
            groups.setdefault(tuple(np.round(log[column].to_numpy(dtype=float), 6)), []).append(name)
    return {" = ".join(names): logs[names[0]] for names in groups.values()}


def plot_concept_metrics(logs: dict[str, pd.DataFrame]):
    """Validation concept AUROC and ECE of the NW head per epoch."""
    fig = _per_epoch(logs, [("val_concept_auroc", "validation concept AUROC (NW)"),
                            ("val_concept_ece", "validation concept ECE (NW)")])
    fig.axes[0].axhline(0.5, color="0.7", lw=0.8, ls="--")
    return fig


def plot_bank_exemplars(volumes: list[np.ndarray], concepts: pd.DataFrame, max_columns: int = 6):
    """Axial slice through the middle of each exemplar's CT, titled with its abnormal concepts."""
    n = min(len(volumes), max_columns * 4)
    cols = min(n, max_columns)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.4 * rows), squeeze=False)
    lo, hi = window_limits("mediastinal")
    short = {c: c.replace("concept_", "").replace("_abnormal", "") for c in CONCEPT_NAMES}
    for ax in axes.flat:
        ax.axis("off")
    for ax, volume, (_, row) in zip(axes.flat, volumes[:n], concepts.iloc[:n].iterrows()):
        centre = tuple(s // 2 for s in volume.shape)
        ax.imshow(radiological_slices(volume, centre)["axial"], cmap="gray", vmin=lo, vmax=hi)
        abnormal = [short[c] for c in CONCEPT_NAMES if row[c] == 1]
        ax.set_title("\n".join(abnormal) or "none abnormal", fontsize=9)  # one per line: never into the next panel
    fig.tight_layout()
    return fig


def plot_clip_logits(logits: np.ndarray, loss: float, tau: float):
    """One batch's CLIP similarity matrix (CT i against table j, divided by τ): the loss pushes the diagonal up."""
    fig, ax = plt.subplots(figsize=(4.6, 3.9))
    image = ax.imshow(logits, cmap="viridis")
    ax.set_xlabel("table j")
    ax.set_ylabel("CT i")
    ax.set_title(f"cos(e_img_i, e_tab_j) / τ  (τ = {tau:.3g}); CLIP loss {loss:.3f}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_nw_weights(weights: dict[str, np.ndarray], max_queries: int = 3):
    """NW weights of a few queries over the support bank at several temperatures: near-uniform at τ = 1 (every
    exemplar counts the same, the prediction is the bank's prevalence), peaked at small τ. ``weights``: τ label →
    (queries, S)."""
    n = len(weights)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 2.8), sharey=True, squeeze=False)
    for ax, (label, w) in zip(axes.flat, weights.items()):
        support = np.arange(w.shape[1])
        for q in range(min(max_queries, w.shape[0])):
            ax.plot(support, w[q], marker=".", lw=0.8, label=f"query {q + 1}")
        ax.axhline(1.0 / w.shape[1], color="0.6", ls="--", lw=0.8)
        effective = float(np.mean(1.0 / (w ** 2).sum(axis=1)))
        ax.set_title(f"{label}: effective supports {effective:.1f} of {w.shape[1]}", fontsize=9)
        ax.set_xlabel("support exemplar")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].set_ylabel("NW weight")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
