"""Figures tell methods apart: one colour per method, shared by its seeds and both selections."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from xcardia.config import get_profile  # noqa: E402
from xcardia.figures import method_colour  # noqa: E402
from xcardia.figures.evaluation import plot_curve  # noqa: E402
from xcardia.reporting import group_of  # noqa: E402


def test_every_method_of_the_study_profile_has_its_own_colour_and_its_seeds_share_it():
    runs = list(get_profile("study").pretrain_runs) + ["scratch_s0", "scratch_s1"]
    by_method: dict[str, set[str]] = {}
    for name in runs + [f"{r}@last" for r in runs if not r.startswith("scratch")]:
        by_method.setdefault(group_of(name).split("@")[0], set()).add(method_colour(name))
    assert all(len(colours) == 1 for colours in by_method.values()), by_method
    colours = [next(iter(c)) for c in by_method.values()]
    assert len(set(colours)) == len(colours), by_method  # no two methods alike
    assert "0.6" not in colours  # the colour of an unknown name


def test_the_k_shot_curve_draws_each_init_in_its_methods_colour():
    curve = pd.DataFrame([{"protocol": "probe", "init": init, "value": k, "mean": 0.6, "ci_low": 0.5, "ci_high": 0.7}
                          for init in ("clip_s0", "xcardia_paper_s0", "scratch_s0") for k in (1, 5)])
    fig = plot_curve(curve, "k")
    lines = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert lines == {name: method_colour(name) for name in ("clip_s0", "xcardia_paper_s0", "scratch_s0")}
    assert len(set(lines.values())) == 3


def test_the_gate_figure_draws_the_pass_line_the_rule_sets_over_the_reference_grid():
    import json
    from pathlib import Path

    from xcardia.figures.resolution import plot_gate
    from xcardia.resolution import GATE_AUROC_RISE, GATE_CORRELATION_RISE, LVWT_TASK, gate_pass_lines

    gate = json.loads((Path(__file__).parents[1] / "results" / "resolution" / "gate.json").read_text())
    fig = plot_gate(gate, LVWT_TASK, gate_pass_lines(gate))
    reference = gate["arms"]["32"]
    expected = (reference["visibility"][LVWT_TASK]["best_auroc"] + GATE_AUROC_RISE,
                max(abs(v["spearman"]) for v in reference["correlations"].values()) + GATE_CORRELATION_RISE)
    for ax, level in zip(fig.axes, expected):
        pass_lines = [line for line in ax.get_lines() if line.get_label().startswith("pass line")]
        assert len(pass_lines) == 1 and np.allclose(pass_lines[0].get_ydata(), level)
        assert ax.get_ylim()[0] <= level <= ax.get_ylim()[1]  # the line is inside the axis, not clipped off
