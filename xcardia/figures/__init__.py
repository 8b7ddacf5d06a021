"""Figures: every plot a notebook shows is a function here, saved as PNG and PDF with :func:`save_figure`.

No backend is chosen at import time; notebooks use the inline backend, scripts whatever matplotlib picks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xcardia.config import ABLATION_RUNS
from xcardia.reporting import group_of

#: One colour per method in every figure (every seed and both selections of a method share it); the ablations of
#: the ``study`` profile take the remaining colours in their fixed order.
METHOD_COLOURS = {"scratch": "0.45", "clip": "tab:blue", "xcardia_paper": "tab:red", "xcardia_fixed": "tab:purple",
                  "nw_only": "tab:green",
                  **dict(zip(ABLATION_RUNS, ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"))),
                  "scratch_all": "0.2"}


def method_colour(init: str) -> str:
    """The colour of an init's or run's method: ``xcardia_paper_s2@last`` → ``xcardia_paper``'s (grey if unknown)."""
    return METHOD_COLOURS.get(group_of(init).split("@")[0], "0.6")


#: CT display windows (level, width) in HU.
WINDOWS = {"mediastinal": (40.0, 400.0), "lung": (-600.0, 1500.0)}


def save_figure(fig, output_dir: str | os.PathLike, name: str, dpi: int = 110) -> list[Path]:
    """Save ``fig`` as ``<output_dir>/figures/<name>.png`` and ``.pdf`` (no timestamps, so reruns are identical)."""
    folder = Path(output_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    return paths


def window_limits(window: str) -> tuple[float, float]:
    level, width = WINDOWS[window]
    return level - width / 2.0, level + width / 2.0


def radiological_slices(volume: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS-ordered (X, Y, Z) volume through ``centre``, oriented as a
    radiologist reads them: patient's right on the image left, anterior (axial) or superior (others) up."""
    i, j, k = centre
    return {
        "axial": volume[:, :, k].T[::-1, ::-1],
        "coronal": volume[:, j, :].T[::-1, ::-1],
        "sagittal": volume[i, :, :].T[::-1, ::-1],
    }
