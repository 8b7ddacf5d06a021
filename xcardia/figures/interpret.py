"""Figures of notebook 03: latent phenotype axes, 2-D maps, NW explanations and calibration, saliency."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from xcardia.figures import radiological_slices, window_limits


def plot_r2_heatmap(r2: pd.DataFrame):
    """inits × phenotypes out-of-fold R² of the ridge axes."""
    fig, ax = plt.subplots(figsize=(0.8 * r2.shape[1] + 2.5, 0.5 * r2.shape[0] + 1.5))
    sns.heatmap(r2.astype(float), annot=True, fmt=".2f", vmin=0, vmax=1, cmap="magma", ax=ax, annot_kws={"size": 8})
    ax.set_title("cross-validated R² of a linear read-out (test patients)", fontsize=10)
    ax.tick_params(axis="x", rotation=40, labelsize=8)
    fig.tight_layout()
    return fig


def plot_axis_cosines(cosines: pd.DataFrame, title: str):
    fig, ax = plt.subplots(figsize=(0.55 * len(cosines) + 2.5, 0.5 * len(cosines) + 1.5))
    sns.heatmap(cosines, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="RdBu_r", center=0, ax=ax, annot_kws={"size": 7})
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_traversal(volumes: list[np.ndarray], values: list[float], phenotype: str, predicted: list[float]):
    """Axial mid-slices of patients from low to high along a latent axis."""
    fig, axes = plt.subplots(1, len(volumes), figsize=(2.1 * len(volumes), 2.6))
    lo, hi = window_limits("mediastinal")
    for ax, volume, value, pred in zip(axes, volumes, values, predicted):
        centre = tuple(s // 2 for s in volume.shape)
        ax.imshow(radiological_slices(volume, centre)["axial"], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{phenotype} {value:.2f}\n(axis {pred:.2f})", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"along the {phenotype} axis: low → high", fontsize=10)
    fig.tight_layout()
    return fig


def plot_maps_2d(maps: dict[str, np.ndarray], colours: dict[str, np.ndarray]):
    """Rows: embeddings (e.g. 'CLIP — PCA'); columns: what colours the points (phenotype, concept, label)."""
    fig, axes = plt.subplots(len(maps), len(colours), figsize=(3.4 * len(colours), 3.0 * len(maps)), squeeze=False)
    for r, (title, xy) in enumerate(maps.items()):
        for c, (name, values) in enumerate(colours.items()):
            ax = axes[r, c]
            v = np.asarray(values, dtype=float)
            known = ~np.isnan(v)
            ax.scatter(xy[~known, 0], xy[~known, 1], s=3, c="0.85", rasterized=True)
            sc = ax.scatter(xy[known, 0], xy[known, 1], s=4, c=v[known], cmap="viridis", rasterized=True)
            fig.colorbar(sc, ax=ax, fraction=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_cross_modal_pca(maps: dict[str, dict]):
    """One panel per run: image (circles) and tabular (crosses) embeddings of the same test patients on their
    joint first two principal components (:func:`xcardia.interpret.cross_modal_pca`)."""
    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        for modality, marker, colour in (("image", "o", "#1f77b4"), ("tabular", "x", "#d62728")):
            pts = m["coords"][m["modality"] == modality]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, marker=marker, c=colour, alpha=0.6, linewidths=0.8, label=modality)
        ev = m["explained_variance"]
        ax.set_title(f"{name}\ngap {m['modality_gap']:.2f}, cos matched {m['matched_cosine']:.2f} "
                     f"vs {m['unmatched_cosine']:.2f}", fontsize=9)
        ax.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=9)
        ax.set_ylabel(f"PC2 ({ev[1]:.0%})", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][-1].legend(fontsize=8, loc="best", markerscale=1.5)
    fig.tight_layout()
    return fig


def plot_nw_explanations(query_volumes, query_titles, support_volumes, support_titles):
    """One row per query: its CT, then its top supports titled with their weights and concepts."""
    n_q, n_s = len(query_volumes), len(support_volumes[0])
    lines = max(str(t).count("\n") + 1 for t in [*query_titles, *(t for row in support_titles for t in row)])
    fig, axes = plt.subplots(n_q, n_s + 1, figsize=(2.3 * (n_s + 1), 2.2 * n_q + 0.17 * lines * n_q), squeeze=False)
    lo, hi = window_limits("mediastinal")
    for r in range(n_q):
        for c, (volume, title) in enumerate(zip([query_volumes[r], *support_volumes[r]], [query_titles[r], *support_titles[r]])):
            ax = axes[r, c]
            ax.imshow(radiological_slices(volume, tuple(s // 2 for s in volume.shape))["axial"], cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=9, loc="left")
            ax.axis("off")
    fig.tight_layout()
    return fig


def plot_calibration(curves: dict[str, pd.DataFrame], sweep: pd.DataFrame):
    """Reliability diagrams at a few temperatures, and ECE / effective supports against τ."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
    for name, curve in curves.items():
        ax.plot(curve["confidence"], curve["frequency"], marker="o", ms=3, label=name)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("reliability (test, all concepts)", fontsize=10)
    ax.legend(fontsize=8)
    for ax, column, title in ((axes[1], "ece", "ECE"), (axes[2], "effective_supports", "effective supports 1/Σw²")):
        for split, part in sweep.groupby("split"):
            ax.plot(part["tau"], part[column], marker="o", ms=3, label=split)
        ax.set_xscale("log")
        ax.set_xlabel("NW temperature τ")
        ax.set_title(title, fontsize=10)
        ax.axvline(1.0, color="tab:red", lw=0.8, ls=":")
    axes[2].axhline(sweep["bank_size"].iloc[0], color="0.7", lw=0.8, ls="--")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_saliency_example(volume: np.ndarray, heart: np.ndarray, maps: dict[str, np.ndarray], init: str = ""):
    """One patient's axial slice with each saliency map over it (``init``'s fine-tuned model), the heart outline and
    a colour bar (saliency scaled to its maximum on the slice)."""
    centre = tuple(int(round(v)) for v in np.argwhere(heart).mean(axis=0)) if heart.any() else tuple(s // 2 for s in volume.shape)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3.2))
    lo, hi = window_limits("mediastinal")
    base = radiological_slices(volume, centre)["axial"]
    outline = radiological_slices(heart.astype(float), centre)["axial"]
    axes[0].imshow(base, cmap="gray", vmin=lo, vmax=hi)
    axes[0].contour(outline, levels=[0.5], colors="tab:red", linewidths=0.8)
    axes[0].set_title("CT and heart (label map)", fontsize=9)
    shown = None
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(base, cmap="gray", vmin=lo, vmax=hi)
        overlay = np.clip(radiological_slices(m, centre)["axial"], 0, None)
        top = float(overlay.max()) or 1.0
        shown = ax.imshow(overlay / top, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.contour(outline, levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"{init}: {name}" if init else name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    if shown is not None:
        fig.colorbar(shown, ax=list(axes[1:]), fraction=0.03, pad=0.02, label="positive saliency / slice maximum")
    return fig


def nw_explorer(explain, load_volume, n_test: int, interactive: bool, runs: list[str] | None = None):
    """Pick a pretraining run and a test patient → its NW prediction, its top supports with their weights and
    concepts, and the CT slices of query and supports. ``explain(run, position)`` returns one entry of
    :func:`xcardia.interpret.nw_explanations`; ``load_volume(row)`` a CT; ``runs`` the selectable runs, the first
    the default (put the learned-τ run first: at the paper's τ = 1 every patient gets nearly the same weights and
    the explorer looks stuck). Headless (or without ipywidgets) it returns None: the static figure stands in."""
    if not interactive:
        return None
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    short = ["IVSd", "LVPWd", "LVIDd", "LVIDs"]
    runs = list(runs or [None])

    def fmt(values):
        return "\n".join(f"{s} {'–' if np.isnan(v) else f'{v:.2f}'}" for s, v in zip(short, values))

    def show(run, test_patient: int):
        e = explain(run, test_patient)
        supports = e["supports"]
        fig = plot_nw_explanations([load_volume(e["row"])], [f"query (test {test_patient})\npredicted | truth\n"
                                                             + "\n".join(f"{s} {p:.2f} | {'–' if np.isnan(t) else f'{t:.2f}'}"
                                                                         for s, p, t in zip(short, e["prediction"], e["truth"]))],
                                   [[load_volume(s["row"]) for s in supports]],
                                   [[f"w = {s['weight']:.2f}\n{fmt(s['concepts'])}" for s in supports]])
        fig.suptitle(f"{run or 'NW head'}: the {len(supports)} heaviest supports (w of the whole bank sums to 1)",
                     fontsize=10)
        fig.tight_layout()
        plt.show()
        return fig

    controls = {"test_patient": widgets.IntSlider(min=0, max=max(n_test - 1, 0), value=0, description="test patient")}
    if runs != [None]:
        controls = {"run": widgets.Dropdown(options=runs, value=runs[0], description="run"), **controls}
    else:
        controls = {"run": widgets.fixed(None), **controls}
    return widgets.interactive(show, **controls)
