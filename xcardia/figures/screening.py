"""Screening figures: the one-page patient report, reliability diagrams, decision curves (issue 20)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from xcardia.figures import radiological_slices
from xcardia.schema import CONCEPT_NAMES, LABELS

SHORT = {"lvef_lte_45_flag": "LVEF ≤ 45", "lvwt_gte_13_flag": "LVWT ≥ 1.3", "aortic_stenosis_moderate_severe_flag": "AS",
         "aortic_regurgitation_moderate_severe_flag": "AR", "mitral_regurgitation_moderate_severe_flag": "MR",
         "tricuspid_regurgitation_moderate_severe_flag": "TR", "pulmonary_regurgitation_moderate_severe_flag": "PR",
         "pasp_gte_45_flag": "PASP ≥ 45", "tr_max_gte_32_flag": "TRV ≥ 3.2", "shd_flag": "any SHD"}


def plot_patient_report(volume: np.ndarray, saliency: np.ndarray, row: dict, points: dict, task: str,
                        synthetic: bool):
    """One patient: the encoder's input (axial/coronal mid-slices, the occlusion map of the highest-risk task over
    it), the ten calibrated risks with both operating points marked, and the NW concept estimates."""
    fig = plt.figure(figsize=(9.0, 6.2))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.0, 1.1])
    centre = tuple(s // 2 for s in volume.shape)
    slices = radiological_slices(volume, centre)
    relative = saliency - np.median(saliency)  # relative to hiding a typical region (the map has an offset)
    scale = float(relative.max()) if relative.max() > 0 else 1.0
    heat = radiological_slices(np.clip(relative / scale, 0, 1), centre)
    for col, view in enumerate(("axial", "coronal")):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(slices[view], cmap="gray", vmin=-1, vmax=1)
        shown = np.ma.masked_less(heat[view], 0.2)  # only where hiding the region lowers the risk noticeably
        ax.imshow(shown, cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"{view} (encoder input, {volume.shape[0]}³)\noverlay: occlusion, {SHORT.get(task, task)}",
                     fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, 2])
    concepts = [(name, row.get(f"concept_{name}")) for name in CONCEPT_NAMES]
    if all(v is not None for _, v in concepts):
        ax.barh([n.replace("_abnormal", "") for n, _ in concepts], [v for _, v in concepts], color="tab:purple")
        ax.set_xlim(0, 1)
        ax.set_title("NW concept estimates\n(P abnormal, from exemplars)", fontsize=9)
        ax.tick_params(labelsize=8)
    else:
        ax.text(0.5, 0.5, "no NW bank\n(scratch init)", ha="center", va="center", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    risks = [row[f"risk_{t}"] for t in LABELS]
    y = np.arange(len(LABELS))
    ax.barh(y, risks, color=["tab:red" if row[f"flag_specificity_90_{t}"] else
                             "tab:orange" if row[f"flag_sensitivity_90_{t}"] else "0.6" for t in LABELS])
    for i, t in enumerate(LABELS):
        for point, marker in (("sensitivity_90", "|"), ("specificity_90", "x")):
            thr = points[t][point]["threshold"]
            if thr is not None and thr == thr:
                ax.plot([thr], [i], marker=marker, color="k", markersize=9)
    ax.set_yticks(y, [SHORT.get(t, t) for t in LABELS], fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:red", label="flagged at specificity 0.90"),
                       Patch(color="tab:orange", label="flagged at sensitivity 0.90 only"),
                       Patch(color="0.6", label="not flagged"),
                       Line2D([], [], ls="none", marker="|", color="k", markersize=9, label="threshold, sensitivity 0.90"),
                       Line2D([], [], ls="none", marker="x", color="k", markersize=7, label="threshold, specificity 0.90")],
              fontsize=7, loc="lower right", frameon=True)
    ax.set_xlabel("calibrated risk (| threshold at sensitivity 0.90, × at specificity 0.90)", fontsize=9)
    title = f"patient {row['patient_id']}"
    if synthetic:
        title += " — synthetic cohort model: NOT FOR CLINICAL USE"
    fig.suptitle(title, fontsize=10, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_reliability(curves: dict[str, pd.DataFrame], task: str):
    """Reliability diagram of one task before and after calibration (``curves``: label → the bins of
    :func:`xcardia.interpret.reliability_curve`)."""
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for (label, curve), colour in zip(curves.items(), ("tab:orange", "tab:blue")):
        ax.plot(curve["confidence"], curve["frequency"], marker="o", color=colour, label=label)
    ax.set_xlabel("mean predicted risk", fontsize=9)
    ax.set_ylabel("fraction positive", fontsize=9)
    ax.set_title(f"reliability, {SHORT.get(task, task)} (test)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def plot_decision_curves(curves: dict[str, pd.DataFrame]):
    """Net benefit against threshold probability per task, with treat-all and treat-none (Vickers & Elkin 2006)."""
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.2), squeeze=False)
    for ax, (task, curve) in zip(axes[0], curves.items()):
        ax.plot(curve["threshold"], curve["model"], color="tab:blue", label="model")
        ax.plot(curve["threshold"], curve["treat_all"], color="0.5", linestyle="--", label="flag all")
        ax.axhline(0, color="0.2", linewidth=0.8, label="flag none")
        low = min(-0.02, float(np.nanmin(curve["model"])))
        ax.set_ylim(low, max(0.05, float(np.nanmax(curve[["model", "treat_all"]].to_numpy())) * 1.1))
        ax.set_title(SHORT.get(task, task), fontsize=10)
        ax.set_xlabel("threshold probability", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("net benefit", fontsize=9)
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_subgroups(table: pd.DataFrame, tasks: list[str]):
    """Per task (one column): AUROC (top) and calibration slope (bottom) by subgroup with 95 % intervals; a hollow
    marker is a subgroup too small for an interval. Dashed: the whole test split's value (AUROC) and perfect
    calibration (slope 1)."""
    from xcardia.schema import LABEL_SHORT

    fig, axes = plt.subplots(2, len(tasks), figsize=(3.3 * len(tasks) + 0.8, 5.4), sharey="row", squeeze=False)
    groups = list(dict.fromkeys(table["subgroup"]))
    y = np.arange(len(groups))[::-1]
    for c, task in enumerate(tasks):
        part = table[table["task"] == task].set_index("subgroup").reindex(groups)
        for r, (value, low, high, reference, label) in enumerate((
                ("auroc", "auroc_low", "auroc_high", float(part.loc["all", "auroc"]), "AUROC"),
                ("calibration_slope", "slope_low", "slope_high", 1.0, "calibration slope"))):
            ax = axes[r, c]
            v = pd.to_numeric(part[value], errors="coerce")
            lo, hi = pd.to_numeric(part[low], errors="coerce"), pd.to_numeric(part[high], errors="coerce")
            has = lo.notna().to_numpy()
            ax.errorbar(v[has], y[has], xerr=[(v - lo)[has], (hi - v)[has]], fmt="o", color="k", ms=4, capsize=2, lw=1)
            ax.plot(v[~has], y[~has], "o", mfc="white", mec="k", ms=4, label="too small for an interval")
            ax.axvline(reference, color="tab:blue", lw=0.8, ls="--")
            ax.set_yticks(y)
            ax.set_yticklabels([f"{g} (n+ {int(n)})" for g, n in zip(groups, part["n_pos"])], fontsize=8)
            ax.set_xlabel(label, fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            if r == 0:
                ax.set_title(LABEL_SHORT.get(task, task), fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles[:1], labels[:1], loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
