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
    # a run without an NW head (CLIP only) has no NW temperature to show: it is left off that panel
    with_nw = {n: log for n, log in logs.items() if "train_nw" in log and (log["train_nw"].fillna(0) != 0).any()}
    for ax, column, title, runs in ((axes[0], "clip_temperature", "CLIP temperature τ", logs),
                                    (axes[1], "nw_temperature", "NW temperature τ", with_nw)):
        for i, (name, log) in enumerate(_merge_identical(runs, column).items()):
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
    """Validation concept AUROC of the NW head per epoch with the fused query and with the image embedding alone
    (the same bank, its supports represented by their CT alone: what the CT encoder contributes), and the fused
    query's ECE."""
    fig = _per_epoch(logs, [("val_concept_auroc", "validation concept AUROC (NW, fused query)"),
                            ("val_image_query_concept_auroc", "… with the image-only query, same bank"),
                            ("val_concept_ece", "validation concept ECE (NW, fused query)")])
    fig.axes[0].axhline(0.5, color="0.7", lw=0.8, ls="--")
    fig.axes[1].axhline(0.5, color="0.7", lw=0.8, ls="--")
    low = min(ax.get_ylim()[0] for ax in fig.axes[:2])
    high = max(ax.get_ylim()[1] for ax in fig.axes[:2])
    for ax in fig.axes[:2]:  # one scale, so the gap between the two queries reads directly
        ax.set_ylim(low, high)
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


def plot_method_overview():
    """The method in one picture (docs/method.md §2): the CT encoder and the tabular encoder, the CLIP logits between
    their projections, the Nadaraya–Watson head that predicts the four concepts from the fused query over a bank of
    k-means exemplars, and — below — what fine-tuning keeps of it (the CT encoder alone: frozen trunk, trained last
    stage, ten heads). Drawn with matplotlib boxes; no data."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(9.0, 5.2))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 62)
    ax.axis("off")

    def box(x, y, w, h, text, colour, weight="normal"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2", fc=colour, ec="0.3", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5, weight=weight, wrap=True)

    def arrow(x0, y0, x1, y1, style="-|>", colour="0.25", dashed=False, connection="arc3"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=10, color=colour, lw=1.1,
                                     linestyle="--" if dashed else "-", connectionstyle=connection))

    ax.text(1, 60, "Pretraining (CT + echo/ECG tables, no labels)", fontsize=10, weight="bold", va="top")
    box(1, 45, 14, 7, "non-contrast\nchest CT", "#e8e8e8")
    box(20, 45, 17, 7, "3D ResNet\n(CT encoder) → 128-d", "#cfe2f3", "bold")
    box(42, 45, 12, 7, "projection\n→ e_img", "#cfe2f3")
    box(1, 31, 14, 7, "echo + ECG\ntable (46 cols)", "#e8e8e8")
    box(20, 31, 17, 7, "tabular\ntransformer", "#f4cccc", "bold")
    box(42, 31, 12, 7, "projection\n→ e_tab", "#f4cccc")
    box(60, 45, 18, 7, "CLIP logits\ne_img·e_tab / τ (0.07)", "#fff2cc")
    box(60, 31, 18, 7, "NW head: query\nnormalize(e_img + e_tab)", "#d9ead3")
    box(83, 31, 14, 7, "support bank:\nk-means exemplars\n(5 per concept)", "#d9ead3")
    box(60, 19, 18, 6, "4 concepts: IVSd, LVPWd,\nLVIDd, LVIDs abnormal", "#d9ead3")
    box(83, 45, 16, 7, "L = L_clip\n+ λ_nw · L_nw", "#fff2cc", "bold")
    for (x0, y0, x1, y1) in ((15, 48.5, 20, 48.5), (37, 48.5, 42, 48.5), (15, 34.5, 20, 34.5), (37, 34.5, 42, 34.5),
                             (54, 48.5, 60, 48.5), (54, 34.5, 60, 46), (54, 48, 60, 36), (54, 34.5, 60, 34.5),
                             (83, 34.5, 78, 34.5), (69, 31, 69, 25), (78, 48.5, 83, 48.5)):
        arrow(x0, y0, x1, y1)
    arrow(78, 22, 99.6, 45, connection="angle,angleA=0,angleB=90")  # BCE on the observed concepts → L_nw
    ax.text(88, 23, "BCE (observed\nconcepts only)", fontsize=7, ha="center", va="bottom", color="0.3")
    ax.text(69, 28, "cosine kernel, τ_nw\n(1 published, learned fixed)", fontsize=7, ha="left", va="center", color="0.3")

    ax.plot([1, 99], [15.5, 15.5], color="0.6", lw=0.8, ls=":")
    ax.text(1, 14, "Fine-tuning (CT only, ten echo-defined tasks)", fontsize=10, weight="bold", va="top")
    box(1, 2, 14, 6, "CT", "#e8e8e8")
    box(20, 2, 17, 6, "stem + layer1–3\nfrozen (cached)", "#cfe2f3")
    box(42, 2, 12, 6, "layer4\ntrained", "#cfe2f3", "bold")
    box(60, 2, 18, 6, "feature layer\n(re-initialised)", "#cfe2f3")
    box(83, 2, 16, 6, "10 heads,\nmasked BCE", "#fce5cd", "bold")
    for (x0, y0, x1, y1) in ((15, 5, 20, 5), (37, 5, 42, 5), (54, 5, 60, 5), (78, 5, 83, 5)):
        arrow(x0, y0, x1, y1)
    arrow(28.5, 45, 28.5, 8, dashed=True, colour="tab:blue")
    ax.text(29.5, 26, "the CT encoder's\nweights are all\nfine-tuning keeps", fontsize=7, color="tab:blue", va="center")
    fig.tight_layout()
    return fig
