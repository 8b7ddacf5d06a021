"""Figures of the resolution study (:mod:`xcardia.resolution`): AUROC and concept R² against the grid."""

from __future__ import annotations

import numpy as np

from xcardia.figures import method_colour
from xcardia.reporting import in_method_order, method_rank

#: The concepts the NW head guides toward whose R² the study follows (wall thickness first: the study's question).
R2_CONCEPTS = ("IVSd", "LVPWd", "LVEF", "LV mass")


def _arms(metrics: dict) -> list[str]:
    return sorted(metrics["tables"], key=int)


def plot_resolution_auroc(frames: dict, arms: list[str]):
    """Macro AUROC (selected encoders, mean over pretraining seeds, 95 % interval) against the grid per method: 5
    shots (the primary setting) and all labels side by side. ``frames`` maps a setting (``five_shot``,
    ``all_labels``) to its :func:`xcardia.resolution.method_frame`; ``arms`` are the grids on the x axis."""
    import matplotlib.pyplot as plt

    frames = {s: f[~f["method"].str.contains("@")] for s, f in frames.items() if len(f)}
    if not frames:
        raise ValueError("no arm has method tables yet")
    arms = sorted(arms, key=int)
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.4), squeeze=False)
    for ax, (setting, frame) in zip(axes[0], frames.items()):
        frame = in_method_order(frame, "method")
        methods = list(dict.fromkeys(frame["method"]))
        for i, method in enumerate(methods):
            part = frame[frame["method"] == method].set_index("arm").reindex(arms)
            x = np.arange(len(arms)) + (i - (len(methods) - 1) / 2) * 0.08
            y = part["auroc"].astype(float).to_numpy()
            err = np.abs(np.vstack([y - part["ci_low"].astype(float), part["ci_high"].astype(float) - y]))
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=method_colour(method), label=method)
        ax.set_xticks(range(len(arms)), [f"{a}³" for a in arms])
        ax.set_xlabel("grid (same 192 mm field of view)")
        ax.set_ylabel("macro AUROC")
        ax.set_title("5 shots" if setting == "five_shot" else "all labels")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_concept_r2(metrics: dict, concepts=R2_CONCEPTS):
    """Cross-validated R² of wall thickness (IVSd, LVPWd), LVEF and LV mass from each encoder's test features,
    against the grid: the mean over the method's pretraining seeds (points: single seeds)."""
    import matplotlib.pyplot as plt

    from xcardia.reporting import group_of

    arms = _arms(metrics)
    rows = [(arm, group_of(unit), concept, value)
            for arm in arms for unit, r2 in metrics["arms"][arm]["concept_r2"].items()
            for concept, value in r2.items() if value is not None]
    if not rows:
        raise ValueError("no concept R² recorded yet")
    from xcardia.interpret import AXIS_PHENOTYPES

    names = {v: k for k, v in AXIS_PHENOTYPES.items()}
    fig, axes = plt.subplots(1, len(concepts), figsize=(2.6 * len(concepts), 3.0), sharey=True, squeeze=False)
    methods = sorted({r[1] for r in rows}, key=method_rank)
    for ax, concept in zip(axes[0], concepts):
        column = names.get(concept, concept)
        for i, method in enumerate(methods):
            values = [[r[3] for r in rows if r[0] == arm and r[1] == method and r[2] == column] for arm in arms]
            x = np.arange(len(arms)) + (i - (len(methods) - 1) / 2) * 0.08
            means = [np.mean(v) if v else np.nan for v in values]
            ax.plot(x, means, marker="o", color=method_colour(method), label=method)
            for xi, v in zip(x, values):
                ax.scatter([xi] * len(v), v, s=8, color=method_colour(method), alpha=0.5)
        ax.set_xticks(range(len(arms)), [f"{a}³" for a in arms])
        ax.set_title(concept)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("R² from encoder features (test)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_gate(gate: dict, task: str, pass_lines=None):
    """The cohort gate against the grid: what a perfect segmentation of the CT shows of the walls — the best single
    measurement's AUROC for LVWT ≥ 1.3, and the Spearman correlation of each myocardial measurement with IVSd and
    LVPWd (test patients). ``task`` is the wall-thickness task the gate reads (:data:`xcardia.resolution.LVWT_TASK`);
    ``pass_lines`` (:func:`xcardia.resolution.gate_pass_lines`: (level, rise) for the AUROC and the correlation)
    draws the pre-registered pass line over the first (reference) grid, so the axis shows the rise against what was
    asked of it, not only against itself."""
    import matplotlib.pyplot as plt

    arms = sorted(gate["arms"], key=int)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2))
    x = np.arange(len(arms))
    axes[0].plot(x, [gate["arms"][a]["visibility"][task]["best_auroc"] for a in arms], marker="o", color="k",
                 label="best measurement")
    axes[0].plot(x, [gate["arms"][a]["visibility"][task]["lv_wall_thickness_auroc"] for a in arms], marker="s",
                 ls="--", color="tab:red", label="wall thickness")
    axes[0].set_ylabel("AUROC, LVWT ≥ 1.3 cm")
    styles = {"lv_wall_thickness_mm": ("tab:red", "wall thickness"), "myocardial_volume_ml": ("0.4", "myocardial volume")}
    for key in gate["arms"][arms[0]]["correlations"]:
        measurement, phenotype = key.split("~")
        colour, name = styles.get(measurement, ("tab:blue", measurement))
        axes[1].plot(x, [gate["arms"][a]["correlations"][key]["spearman"] for a in arms], color=colour,
                     ls="-" if phenotype == "ivsd_cm" else ":", marker="o",
                     label=f"{name} ~ {'IVSd' if phenotype == 'ivsd_cm' else 'LVPWd'}")
    axes[1].set_ylabel("Spearman ρ")
    for ax, (level, rise) in zip(axes, pass_lines or ()):
        ax.axhline(level, color="tab:green", ls="-.", lw=1.2, label=f"pass line (+{rise:g} over {arms[0]}³)")
    axes[0].legend(fontsize=8, loc="center right")
    low, high = axes[1].get_ylim()
    axes[1].set_ylim(low - 0.9 * (high - low), high)  # room below the lines for the legend
    axes[1].legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.set_xticks(x, [f"{a}³" for a in arms])
        ax.set_xlabel("grid (same 192 mm field of view)")
        ax.grid(alpha=0.3)
    fig.suptitle("From the label map (a perfect segmentation), test patients", fontsize=10)
    fig.tight_layout()
    return fig
