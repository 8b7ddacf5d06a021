"""Every sentence of a notebook is true for the run it sits in (issue 33): Markdown states no measured number and
no comparative result claim; what depends on the run is printed by code from the run."""

from __future__ import annotations

import json
import re

import pytest

from xcardia.reproduce import list_notebooks

#: Numbers Markdown may state: constants of the method, the protocol, the guidelines and the paper — never a result.
ALLOWED_NUMBERS = {
    "0.6", "1.1", "3.5", "5.6", "2.0", "4.0",           # the NW concepts' normal ranges (cm), docs/method.md §1
    "≤ 45", "≥ 1.3", "≥ 3", "≥ 45", "≥ 3.2",            # the ten tasks' thresholds
    "< 50", "< 50 %",                                   # the literature's reduced-LVEF threshold
    "0.76", "0.79",                                     # the literature's CT-only LVEF AUROC (data card sources)
    "1.5", "4 %",                                       # the generator's prevalence design target
    "0.07", "0.1", "0.5", "0.005", "≈ 2.77.",           # CLIP τ, NW τ init, λ_nw, a τ to try, ln 16
    "3.47",                                             # ln 32 (an exercise's answer, a constant)
    "95%", "95 %",                                      # interval level
    "8%", "9.8",                                        # the paper's claims
    "0.90",                                             # operating-point targets
    "1 %", "5 %", "10 %",                               # prevalences for PPV, fraction levels
    "8–10 %",                                           # the heart's volume change over the cycle (the generator's design)
}
NUMBER = re.compile(r"(?<![\w.`/-])(\d+\.\d+\.?|\d+(?:[–-]\d+)?\s?%|[<>≈≤≥]\s?\d[\d.]*(?:\s?%)?)")
#: Phrases that assert a result of the run (they belong in a printed check, not in prose).
RESULT_PHRASES = ("well above", "stays below", "about as visible", "can only predict", "a few exemplars dominate",
                  "is better than", "beats", "outperforms", "is worse than")


def _markdown(path):
    nb = json.loads(path.read_text())
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"])
            text = re.sub(r"`[^`]*`", "", text)  # code spans name things, they do not state results
            text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
            yield index, text


@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.name)
def test_notebook_markdown_states_no_number_the_run_does_not_compute(path):
    found = [(i, m) for i, text in _markdown(path) for m in NUMBER.findall(text)
             if m.strip() not in ALLOWED_NUMBERS and m.strip().lstrip("≈ ") not in ALLOWED_NUMBERS]
    assert not found, f"{path.name}: numbers in Markdown (print them from the run, or allow-list a constant): {found}"


@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.name)
def test_notebook_markdown_makes_no_comparative_result_claim(path):
    found = [(i, p) for i, text in _markdown(path) for p in RESULT_PHRASES if p in text.lower()]
    assert not found, f"{path.name}: result claims in Markdown (compute them in a cell): {found}"


def test_the_scan_finds_a_planted_result():
    text = "The fixed variant scores 0.74, well above CLIP (≈ 0.70); AUROC 83 % for LVEF."
    assert {m for m in NUMBER.findall(text) if m.lstrip("≈ ") not in ALLOWED_NUMBERS} == {"0.74", "≈ 0.70", "83 %"}
    assert any(p in text.lower() for p in RESULT_PHRASES)


@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.name)
def test_every_notebook_has_exercises_with_answers_and_a_reading_order(path):
    text = "\n".join(t for _, t in _markdown(path))
    assert "## Exercises" in text and "<summary>Answers</summary>" in text, path.name
    assert "Reading order" in text, path.name
