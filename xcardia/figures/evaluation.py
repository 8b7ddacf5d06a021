"""Figures of notebooks 04 and 05: AUROC tables, ROC curves, forest plots, the fraction sweep, AUROC against k."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from xcardia.figures import method_colour as _colour
from xcardia.schema import LABEL_SHORT, LABELS


def plot_auroc_heatmap(table: pd.DataFrame, title: str):
    """inits × tasks AUROC (point estimates; the CI table sits beside it in the notebook)."""
    data = table.assign(auroc=pd.to_numeric(table["auroc"], errors="coerce")).pivot(index="init", columns="task", values="auroc")
    data = data[[t for t in (*LABELS, "macro") if t in data.columns]]
    data.columns = [LABEL_SHORT.get(c, c) for c in data.columns]
    fig, ax = plt.subplots(figsize=(1.0 * data.shape[1] + 2, 0.5 * data.shape[0] + 1.5))
    sns.heatmap(data.astype(float), annot=True, fmt=".2f", vmin=0.5, vmax=1.0, cmap="viridis", ax=ax,
                annot_kws={"size": 8})
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_roc_curves(y_test: np.ndarray, predictions: dict, protocol: str, inits, fraction: float = 1.0):
    """ROC curve per task for each init (scores averaged over fine-tuning seeds)."""
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(2, 5, figsize=(16, 6.6))
    for t, ax in enumerate(axes.flat):
        y = y_test[:, t]
        for init in inits:
            runs = [p for (proto, name, frac, _s), p in predictions.items()
                    if proto == protocol and name == init and math.isclose(float(frac), fraction)]
            if not runs:
                continue
            score = np.mean(runs, axis=0)[:, t]
            keep = ~np.isnan(y) & ~np.isnan(score)  # a task skipped for want of training positives has no scores
            if len(np.unique(y[keep])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y[keep], score[keep])
            ax.plot(fpr, tpr, color=_colour(init), lw=1.2, label=init)
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
        n_pos = int(np.nansum(y == 1))
        ax.set_title(f"{LABEL_SHORT[LABELS[t]]} (n+ = {n_pos})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("false positive rate")
    fig.supylabel("true positive rate")
    fig.tight_layout()
    return fig


def plot_forest(paired: pd.DataFrame, title: str):
    """Paired AUROC differences with 95 % CIs, per task and macro, one column per comparison."""
    paired = paired.assign(**{c: pd.to_numeric(paired[c], errors="coerce") for c in ("difference", "ci_low", "ci_high")})
    comparisons = list(dict.fromkeys(paired["comparison"]))
    tasks = [t for t in (*LABELS, "macro") if t in set(paired["task"])]
    n_cols = min(len(comparisons), 2)  # two panels a row: readable at 100 % in a notebook column
    n_rows = -(-len(comparisons) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.2 * n_cols, (0.3 * len(tasks) + 1.0) * n_rows),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(comparisons):]:
        ax.set_visible(False)
    for ax, comparison in zip(axes.flat, comparisons):
        part = paired[paired["comparison"] == comparison].set_index("task").reindex(tasks)
        y = np.arange(len(tasks))[::-1]
        ax.errorbar(part["difference"], y, xerr=[part["difference"] - part["ci_low"], part["ci_high"] - part["difference"]],
                    fmt="o", color="k", ms=4, capsize=2, lw=1)
        ax.axvline(0, color="tab:red", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([LABEL_SHORT.get(t, t) for t in tasks], fontsize=8)
        ax.set_title(comparison, fontsize=10)
        ax.set_xlabel("AUROC difference")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curve(curve: pd.DataFrame, xlabel: str, log_x: bool = False, title: str = ""):
    """Macro AUROC (mean over seeds with CI band) against fraction or k, one line per init, one panel per protocol."""
    curve = curve.assign(**{c: pd.to_numeric(curve[c], errors="coerce") for c in ("value", "mean", "ci_low", "ci_high")})
    protocols = list(dict.fromkeys(curve["protocol"]))
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.6 * len(protocols), 3.4), sharey=True, squeeze=False)
    for ax, protocol in zip(axes.flat, protocols):
        for init, group in curve[curve["protocol"] == protocol].groupby("init", sort=False):
            group = group.sort_values("value")
            ax.plot(group["value"], group["mean"], marker="o", ms=4, color=_colour(init), label=init)
            ax.fill_between(group["value"], group["ci_low"], group["ci_high"], color=_colour(init), alpha=0.15)
        if log_x:
            ax.set_xscale("log")
        ax.axhline(0.5, color="0.8", lw=0.8, ls="--")
        ax.set_title(f"{protocol} protocol", fontsize=10)
        ax.set_xlabel(xlabel)
    axes.flat[0].set_ylabel("macro AUROC (test)")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
