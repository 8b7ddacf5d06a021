"""Figures of notebooks 04 and 05: AUROC tables, ROC curves, forest plots, the fraction sweep, AUROC against k."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from xcardia.figures import method_colour as _colour
from xcardia.schema import LABEL_SHORT, LABELS

#: Below this many test positives a per-task number is shown as too few (ROC panels, notebook tables).
MIN_POSITIVES = 5


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
        if n_pos < MIN_POSITIVES:  # a curve through one or two points teaches nothing: say why the panel is empty
            for line in ax.lines[:-1]:
                line.remove()
            ax.text(0.5, 0.5, f"{n_pos} test positive{'s' if n_pos != 1 else ''}:\ntoo few for a curve", ha="center",
                    va="center", fontsize=8, color="0.35", transform=ax.transAxes)
        ax.set_title(f"{LABEL_SHORT[LABELS[t]]} (n+ = {n_pos})", fontsize=9)
        ax.tick_params(labelsize=7)
    handles = {l.get_label(): l for ax in axes.flat for l in ax.lines if not l.get_label().startswith("_")}
    axes.flat[0].legend(handles.values(), handles.keys(), fontsize=8)
    fig.supxlabel("false positive rate")
    fig.supylabel("true positive rate")
    fig.tight_layout()
    return fig


def plot_forest(paired: pd.DataFrame, title: str, claimed: float | None = None):
    """Paired AUROC differences with 95 % CIs, per task and macro, one panel per comparison, all on one x-scale;
    ``claimed``: a dotted mark at the paper's claimed gain (e.g. +0.08 with all labels)."""
    paired = paired.assign(**{c: pd.to_numeric(paired[c], errors="coerce") for c in ("difference", "ci_low", "ci_high")})
    comparisons = list(dict.fromkeys(paired["comparison"]))
    tasks = [t for t in (*LABELS, "macro") if t in set(paired["task"])]
    n_cols = min(len(comparisons), 2)  # two panels a row: readable at 100 % in a notebook column
    n_rows = -(-len(comparisons) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.2 * n_cols, (0.3 * len(tasks) + 1.0) * n_rows),
                             sharey=True, sharex=True, squeeze=False)
    for ax in axes.flat[len(comparisons):]:
        ax.set_visible(False)
    for ax, comparison in zip(axes.flat, comparisons):
        part = paired[paired["comparison"] == comparison].set_index("task").reindex(tasks)
        y = np.arange(len(tasks))[::-1]
        ax.errorbar(part["difference"], y, xerr=[part["difference"] - part["ci_low"], part["ci_high"] - part["difference"]],
                    fmt="o", color="k", ms=4, capsize=2, lw=1)
        ax.axvline(0, color="tab:red", lw=0.8)
        if claimed is not None:
            ax.axvline(claimed, color="tab:blue", lw=0.8, ls=":", label=f"paper's claim (+{claimed:.2f})")
        ax.set_yticks(y)
        ax.set_yticklabels([LABEL_SHORT.get(t, t) for t in tasks], fontsize=8)
        ax.set_title(comparison, fontsize=10)
        ax.set_xlabel("AUROC difference")
        ax.tick_params(labelbottom=True)
    if claimed is not None:
        axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curve(curve: pd.DataFrame, xlabel: str, log_x: bool = False, title: str = "", macro: str = "trained",
               percent: bool = False):
    """Macro AUROC (mean over seeds with CI band) against fraction or k, one line per init, one panel per protocol.

    ``macro``: ``"trained"`` (the tasks trained and scored) or ``"public"`` (the public code's: every task with both
    classes in test, ``public_*`` columns of :func:`xcardia.reporting.curve_table`). Each point is labelled with the
    number of tasks its macro averages when that number varies along a line. A protocol with a single value per init
    (``scratch_all``: one fraction) is drawn as stars in the ``paper`` panel instead of a panel of its own. Ticks sit
    at the measured values (``percent``: as percentages)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    from xcardia.reporting import method_rank

    prefix = "public_" if macro == "public" else ""
    columns = {"mean": f"{prefix}mean", "ci_low": f"{prefix}ci_low", "ci_high": f"{prefix}ci_high",
               "n_tasks": "public_n_tasks" if macro == "public" else "n_tasks"}
    curve = curve.assign(**{k: pd.to_numeric(curve[v], errors="coerce") if v in curve else np.nan
                            for k, v in columns.items()}, value=pd.to_numeric(curve["value"], errors="coerce"))
    single = [p for p in dict.fromkeys(curve["protocol"])
              if curve[curve["protocol"] == p].groupby("init")["value"].nunique().max() <= 1 and p != "paper"]
    protocols = [p for p in dict.fromkeys(curve["protocol"]) if p not in single]
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.6 * len(protocols), 3.5), sharey=True, squeeze=False)
    for ax, protocol in zip(axes.flat, protocols):
        part = curve[curve["protocol"] == protocol]
        for init in sorted(dict.fromkeys(part["init"]), key=method_rank):
            group = part[part["init"] == init].sort_values("value")
            if len(group) == 1:  # one value (e.g. k-shot with the paper protocol at k = 5 only): a point with its CI
                ax.errorbar(group["value"], group["mean"], yerr=[group["mean"] - group["ci_low"], group["ci_high"] - group["mean"]],
                            fmt="o", ms=4, capsize=3, color=_colour(init), label=init)
                continue
            ax.plot(group["value"], group["mean"], marker="o", ms=4, color=_colour(init), label=init)
            ax.fill_between(group["value"], group["ci_low"], group["ci_high"], color=_colour(init), alpha=0.15)
        counts = part.groupby("value")["n_tasks"].max()
        if counts.nunique() > 1:
            top = part.groupby("value")["mean"].max()
            for value, n in counts.items():
                ax.annotate(f"{int(n)} tasks", (value, top[value]), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7, color="0.35")
        if protocol == "paper":
            for other in single:
                for init, group in curve[curve["protocol"] == other].groupby("init"):
                    ax.plot(group["value"], group["mean"], marker="*", ms=10, ls="none", color=_colour(other),
                            label=f"{init} ({other})")
        if log_x:
            ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sorted(part["value"].dropna().unique())))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}" if percent else f"{v:g}"))
        ax.axhline(0.5, color="0.8", lw=0.8, ls="--")
        ax.set_title(f"{protocol} protocol", fontsize=10)
        ax.set_xlabel(xlabel)
    axes.flat[0].set_ylabel("macro AUROC (test)" + (", public macro" if macro == "public" else ""))
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
