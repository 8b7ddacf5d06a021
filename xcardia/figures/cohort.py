"""Figures of notebook 01: what the cohort is and why it is credible."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from xcardia.schema import COLUMN_BY_NAME, LABEL_SHORT
from xcardia.figures import radiological_slices, window_limits


def plot_phenotypes_by_sex(manifest: pd.DataFrame, columns: list[str], ncols: int = 4):
    """Histogram of each phenotype by sex, with its reference interval shaded (ASE/EACVI 2015 etc.). Four panels a
    row, 2.5 inches each: readable at 100 % in a ~1,100 px notebook column."""
    columns = [c for c in columns if c in manifest and manifest[c].notna().any()]
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.1 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        spec = COLUMN_BY_NAME[col]
        data = manifest[[col, "sex"]].dropna() if "sex" in manifest else manifest[[col]].dropna()
        if spec.normal is not None:
            lo, hi = spec.normal
            ax.axvspan(max(lo, data[col].min()), min(hi, data[col].max()), color="0.85", zorder=0, label="reference")
        sns.histplot(data=data, x=col, hue="sex" if "sex" in data else None, bins=30, element="step", stat="density",
                     common_norm=False, ax=ax, palette={"M": "tab:blue", "F": "tab:red"} if "sex" in data else None)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel(spec.unit, fontsize=9)
        ax.set_ylabel("")
        ax.tick_params(labelsize=8)
        if ax is not axes.flat[0] and ax.get_legend():
            ax.get_legend().remove()
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_prevalence(prevalence: pd.DataFrame):
    """Measured label prevalence beside the EchoNext training-set reference."""
    df = prevalence.reset_index()
    long = pd.concat([
        pd.DataFrame({"task": df["short"], "prevalence": df["prevalence"], "source": "this cohort"}),
        pd.DataFrame({"task": df["short"], "prevalence": df["echonext"], "source": "EchoNext (reference)"}),
    ])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    sns.barplot(data=long, x="task", y="prevalence", hue="source", ax=ax, palette=["tab:blue", "0.6"])
    ax.set_xlabel("")
    ax.set_ylabel("prevalence")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def plot_correlation(manifest: pd.DataFrame, columns: list[str]):
    """Spearman correlation between phenotypes (pairwise complete)."""
    corr = manifest[[c for c in columns if c in manifest]].corr(method="spearman")
    fig, ax = plt.subplots(figsize=(11, 9))
    sns.heatmap(corr, cmap="RdBu_r", vmin=-1, vmax=1, center=0, ax=ax, square=True, cbar_kws={"shrink": 0.6},
                xticklabels=True, yticklabels=True)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_missingness(missing: pd.DataFrame):
    """Share missing per column, overall and split by rhythm (PR and A-wave are missing in AF by design)."""
    shown = missing[missing["missing"] > 0]  # the rows and column order of the table the notebook prints
    fig, ax = plt.subplots(figsize=(5.0, 0.24 * len(shown) + 1.4))
    sns.heatmap(shown, annot=True, fmt=".2f", cmap="Greys", vmin=0, vmax=1, cbar=False, ax=ax, annot_kws={"size": 8})
    ax.tick_params(axis="y", labelsize=8)
    # headers such as "missing in sinus rhythm" would overlap side by side: wrapped onto two lines, tilted
    ax.set_xticklabels([t.get_text().replace("_", " ").replace(" in ", "\nin ", 1) for t in ax.get_xticklabels()],
                       rotation=30, ha="left", fontsize=8)
    ax.xaxis.tick_top()
    fig.tight_layout()
    return fig


def _heart_centre(labelmap: np.ndarray) -> tuple[int, int, int]:
    heart = np.isin(labelmap, (8, 9, 10, 11, 12, 13))
    if heart.any():
        return tuple(int(round(v)) for v in np.argwhere(heart).mean(axis=0))
    return tuple(s // 2 for s in labelmap.shape)


def plot_ct_gallery(volumes: dict[str, tuple[np.ndarray, tuple[int, int, int]]]):
    """Axial, coronal and sagittal slices (mediastinal window) plus an axial lung-window view.

    Args:
        volumes: title → (HU volume, voxel the three slices pass through).
    """
    fig, axes = plt.subplots(len(volumes), 4, figsize=(10, 2.6 * len(volumes)), squeeze=False)
    for row, (title, (hu, centre)) in enumerate(volumes.items()):
        slices = radiological_slices(hu, centre)
        for col, (view, window) in enumerate((("axial", "mediastinal"), ("coronal", "mediastinal"),
                                              ("sagittal", "mediastinal"), ("axial", "lung"))):
            lo, hi = window_limits(window)
            axes[row, col].imshow(slices[view], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(f"{view} ({window})", fontsize=9)
        axes[row, 0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_hu_histograms(hu_long: pd.DataFrame):
    """HU distribution per structure, with the Agatston 130 HU threshold marked."""
    order = list(dict.fromkeys(hu_long["structure"]))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(order) + 1))
    sns.boxplot(data=hu_long, y="structure", x="hu", order=order, ax=ax, fliersize=0.5, color="0.8")
    ax.axvline(130, color="tab:red", lw=1, ls="--")
    ax.text(135, -0.4, "130 HU", color="tab:red", fontsize=7, va="bottom")
    ax.set_xlabel("HU")
    ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_phase_pair(volumes: list[np.ndarray], labelmaps: list[np.ndarray], titles: list[str]):
    """The same patient at two cardiac phases: axial and coronal slices and their difference."""
    centre = _heart_centre(labelmaps[0])
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    lo, hi = window_limits("mediastinal")
    for col in range(2):
        s = radiological_slices(volumes[col], centre)
        for row, view in enumerate(("axial", "coronal")):
            axes[row, col].imshow(s[view], cmap="gray", vmin=lo, vmax=hi)
            axes[row, col].set_title(f"{titles[col]} — {view}", fontsize=9)
    diff = volumes[0].astype(float) - volumes[1].astype(float)
    s = radiological_slices(diff, centre)
    for row, view in enumerate(("axial", "coronal")):
        image = axes[row, 2].imshow(s[view], cmap="RdBu_r", vmin=-150, vmax=150)
        axes[row, 2].set_title(f"difference — {view}", fontsize=9)
        fig.colorbar(image, ax=axes[row, 2], fraction=0.046, label="HU")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_ct_vs_phenotype(frame: pd.DataFrame, pairs: list[tuple[str, str]]):
    """Scatter of a label-map CT measurement against the echo phenotype it should reflect, with Spearman ρ."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.2), squeeze=False)
    for ax, (x, y) in zip(axes.flat, pairs):
        data = frame[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
        ax.scatter(data[x], data[y], s=4, alpha=0.35, color="tab:blue", rasterized=True)
        rho = data[x].corr(data[y], method="spearman") if len(data) > 2 else math.nan
        ax.set_title(f"Spearman ρ = {rho:.2f}", fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
    fig.tight_layout()
    return fig


def plot_visibility(visibility: pd.DataFrame):
    """AUROC of each single CT measurement per task (orientation-free), the realism check of the cohort."""
    measures = [c for c in visibility.columns if c not in ("best_measurement", "best_auroc", "n_pos", "n_neg")]
    data = visibility[measures].astype(float)
    empty = [m for m in measures if data[m].isna().all()]
    data = data.drop(columns=empty)  # e.g. heart/thorax ratio: undefined on a heart-centred field of view
    data.index = [LABEL_SHORT.get(t, t) for t in data.index]
    fig, ax = plt.subplots(figsize=(min(1.0 * len(data.columns) + 2.5, 10), 4.2))
    sns.heatmap(data, annot=True, fmt=".2f", vmin=0.5, vmax=1.0, cmap="viridis", ax=ax, annot_kws={"size": 8})
    ax.tick_params(axis="x", rotation=35, labelsize=8)
    ax.set_title("AUROC of each single CT measurement per task", fontsize=10)
    if empty:
        fig.text(0.01, 0.005, f"not shown (undefined on this field of view): {', '.join(empty)}", fontsize=7,
                 color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03 if empty else 0, 1, 1))
    return fig


def slice_montage(volume: np.ndarray, window: str = "mediastinal"):
    """Eight axial slices of a CT side by side: the static view, which reads the same in a saved or reopened
    notebook (a widget's output does not outlive its kernel)."""
    lo, hi = window_limits(window)
    ks = np.linspace(0, volume.shape[2] - 1, 10).astype(int)[1:-1]
    fig, axes = plt.subplots(1, len(ks), figsize=(2 * len(ks), 2.2))
    for ax, k in zip(axes, ks):
        ax.imshow(volume[:, :, k].T[::-1, ::-1], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"z = {k}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def slice_viewer(volume: np.ndarray, interactive: bool, window: str = "mediastinal"):
    """Scroll through the axial slices of a CT: with ``interactive`` and ipywidgets, a slider that drives the view;
    otherwise None. Show :func:`slice_montage` beside it: after a reopen the slider's output is gone, the montage
    is not."""
    lo, hi = window_limits(window)
    if not interactive:
        return None
    try:
        import ipywidgets as widgets
    except ImportError:
        return None

    def show(axial_slice: int):
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(volume[:, :, axial_slice].T[::-1, ::-1], cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"axial slice {axial_slice}", fontsize=10)
        ax.axis("off")
        plt.show()

    return widgets.interactive(show, axial_slice=widgets.IntSlider(volume.shape[2] // 2, 0, volume.shape[2] - 1))


def plot_crop_boxes(previews: list[dict], spacing_mm: float):
    """What the encoder sees of real CTs: axial and coronal slices through the crop centre of each resampled CT
    with the kept box drawn (no identifiers in the titles: aggregates and anonymous examples only)."""
    from matplotlib.patches import Rectangle

    n = len(previews)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.2), squeeze=False)
    lo, hi = window_limits("mediastinal")
    for col, preview in enumerate(previews):
        volume, box, (i, j, k) = preview["volume"], preview["box"], preview["centre"]
        slices = radiological_slices(volume, (i, j, k))
        for row, (view, (a, b)) in enumerate((("axial", (0, 1)), ("coronal", (0, 2)))):
            ax = axes[row, col]
            ax.imshow(slices[view], cmap="gray", vmin=lo, vmax=hi)
            # radiological display flips both axes: map the box's voxel ranges the same way
            width, height = volume.shape[a], volume.shape[b]
            x0, x1 = width - box[a][1], width - box[a][0]
            y0, y1 = height - box[b][1], height - box[b][0]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="tab:orange", lw=1.5))
            ax.set_title(f"CT {col + 1}, {view}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"the box each CT is cropped to ({spacing_mm:g} mm voxels); orange: what the encoder sees", fontsize=9)
    fig.tight_layout()
    return fig
