"""The papermill runner: order, failure reporting, the smoke reproduction, and nbval on a fresh rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from xcardia.reproduce import NotebookFailed, list_notebooks, reproduce
from xcardia.results import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _write_notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\nseed = 0\noutput_dir = None\ndata = None\ninteractive = True')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_notebooks_run_in_numeric_order(tmp_path):
    for name in ("10_b.ipynb", "2_a.ipynb", "notes.ipynb", "01_c.ipynb"):
        _write_notebook(tmp_path / name, "pass")
    assert [p.name for p in list_notebooks(tmp_path)] == ["01_c.ipynb", "2_a.ipynb", "10_b.ipynb"]


def test_first_failing_notebook_stops_the_run_naming_notebook_and_cell(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "01_ok.ipynb", "x = 1")
    _write_notebook(nbs / "02_bad.ipynb", "y = 2", "raise ValueError('bad cohort')")
    _write_notebook(nbs / "03_never.ipynb", "z = 3")
    with pytest.raises(NotebookFailed, match=r"02_bad\.ipynb failed in cell \d+ .*ValueError: bad cohort"):
        reproduce(profile="smoke", out=tmp_path / "out", notebooks=nbs, log=lambda *_: None)
    assert (tmp_path / "out" / "notebooks" / "01_ok.ipynb").exists()
    assert not (tmp_path / "out" / "notebooks" / "03_never.ipynb").exists()


def test_cli_reproduce_failure_exits_non_zero_with_one_error_line(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "01_bad.ipynb", "1 / 0")
    result = subprocess.run([sys.executable, "-m", "xcardia", "reproduce", "--profile", "smoke", "--out",
                             str(tmp_path / "o"), "--notebooks", str(nbs)], capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "01_bad.ipynb" in errors[0] and "ZeroDivisionError" in errors[0]


def test_smoke_reproduction_executes_every_notebook(smoke_reproduction):
    executed = sorted(p.name for p in (smoke_reproduction / "notebooks").glob("*.ipynb"))
    assert executed == [p.name for p in list_notebooks()]
    for path in (smoke_reproduction / "notebooks").glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, path.name


def test_smoke_reproduction_writes_metrics_summary_and_figures(smoke_reproduction):
    metrics = read_metrics(smoke_reproduction)
    assert metrics["run"]["profile"] == "smoke"
    assert metrics["cohort"]["n_patients"] == 300
    assert {"pretraining", "interpretability", "finetune", "fewshot", "claims"} <= set(metrics)
    assert (smoke_reproduction / "summary.md").read_text().startswith("# X-Cardia companion")
    pngs = {p.stem for p in (smoke_reproduction / "figures").glob("*.png")}
    pdfs = {p.stem for p in (smoke_reproduction / "figures").glob("*.pdf")}
    assert "01_ct_gallery" in pngs and pngs == pdfs


def _rerun_with_nbval(executed: Path, tmp_path: Path, fresh_output: Path | None) -> subprocess.CompletedProcess:
    nb = nbformat.read(executed, as_version=4)
    if fresh_output is not None:
        for cell in nb.cells:
            if "injected-parameters" in cell.metadata.get("tags", []):
                lines = [f"output_dir = {str(fresh_output)!r}" if line.startswith("output_dir") else line
                         for line in cell.source.splitlines()]
                cell.source = "\n".join(lines)
    copy = tmp_path / executed.name
    nbformat.write(nb, copy)
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-q",
                           "-p", "no:cacheprovider", str(copy)], capture_output=True, text=True, cwd=tmp_path)


#: Notebooks nbval reruns from scratch in a new output folder (everything recomputed: cohort, training, tables);
#: the others rerun in the reproduction's folder, reusing its pretraining runs.
FRESH_RERUN = {"01_data.ipynb", "02_pretraining.ipynb"}


@pytest.mark.parametrize("notebook", [p.name for p in list_notebooks()])
def test_nbval_checked_cells_give_identical_output_on_a_rerun(smoke_reproduction, tmp_path, notebook):
    fresh = tmp_path / "fresh" if notebook in FRESH_RERUN else None
    result = _rerun_with_nbval(smoke_reproduction / "notebooks" / notebook, tmp_path, fresh)
    assert result.returncode == 0, result.stdout[-3000:]
    if fresh is not None:
        assert (fresh / "cohort" / "cohort.json").exists()  # it really regenerated everything


def test_repository_notebooks_are_committed_clean_with_a_parameters_cell():
    for path in list_notebooks():
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") for c in code), f"{path.name} has outputs"
        assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in code) == 1, path.name


def test_notebook_01_runs_on_a_real_manifest_in_paper_names_and_shows_no_patient_ids(paper_cohort, tmp_path):
    out = reproduce(profile="smoke", out=tmp_path / "real", data=paper_cohort, only=["01"], log=lambda *_: None)
    text = (out / "notebooks" / "01_data.ipynb").read_text()
    outputs = [o for c in nbformat.reads(text, as_version=4).cells if c.cell_type == "code" for o in c.get("outputs", [])]
    texts = [o.get("text", "") for o in outputs] + [
        str(o.get("data", {}).get(kind, "")) for o in outputs for kind in ("text/plain", "text/html")]
    rendered = "\n".join(texts)  # what a reader sees (images are checked by eye: aggregate plots only)
    assert "real cohort" in rendered
    for pid in ("P01", "P02", "P03", "P04"):
        assert pid not in rendered
    assert read_metrics(out)["cohort"]["synthetic"] is False


@pytest.mark.parametrize("source, message", [
    ("import time\ntime.sleep(60)", r"01_slow\.ipynb ran past the per-cell limit of 3 s .* in cell \d+"),
    ("import os\nos._exit(1)", r"01_slow\.ipynb lost its kernel .* in cell"),
])
def test_a_timeout_or_a_dead_kernel_is_one_message_naming_notebook_and_cell(tmp_path, source, message):
    """Issue 12: long work is never killed silently — and when a limit or a crash does stop a notebook, the runner
    says which notebook and cell, in one line, instead of an nbclient traceback."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "01_slow.ipynb", "x = 1", source)
    with pytest.raises(NotebookFailed, match=message):
        reproduce(profile="smoke", out=tmp_path / "out", notebooks=nbs, log=lambda *_: None, cell_timeout_s=3)


def test_training_profiles_have_no_per_cell_limit():
    from xcardia.config import PROFILES

    assert PROFILES["cpu"].notebook_timeout_s is None and PROFILES["paper"].notebook_timeout_s is None


def test_executed_smoke_notebooks_write_nothing_to_stderr_and_show_no_stray_reprs(smoke_reproduction):
    """Issue 33.5: a warning in an executed notebook is noise a student reads as a problem; a bare ``PosixPath(...)``
    is a cell that forgot to assign what it returned."""
    noise = []
    for path in sorted((smoke_reproduction / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for index, cell in enumerate(nb.cells):
            for output in cell.get("outputs", []):
                if output.output_type == "stream" and output.name == "stderr":
                    noise.append((path.name, index, output.text[:160]))
                if output.output_type == "execute_result" and "PosixPath(" in str(output.get("data", {}).get("text/plain", "")):
                    noise.append((path.name, index, "a stray PosixPath repr"))
    assert not noise, noise
