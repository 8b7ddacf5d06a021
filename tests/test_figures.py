"""Figures tell methods apart: one colour per method, shared by its seeds and both selections."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

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
