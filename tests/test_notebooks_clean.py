"""Committed notebooks are clean: no outputs, no execution counts, one `parameters` cell, cell ids, and notebook
metadata that JupyterLab does not rewrite when it opens them (so opening and closing leaves `git status` clean)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: What JupyterLab writes for the default kernel of an ipykernel install; anything else is rewritten on open.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs_and_stable_metadata(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") for c in code), "outputs committed: run nbstripout"
    assert all(c.get("execution_count") is None for c in code), "execution counts committed: run nbstripout"
    assert nb["metadata"] == {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    assert all("id" in c for c in nb["cells"]), "cells without ids are rewritten by nbformat ≥ 5.1"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in code) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbstripout_leaves_committed_notebooks_unchanged(path, tmp_path):
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    subprocess.run([sys.executable, "-m", "nbstripout", "--keep-id", str(copy)], check=True, timeout=60)
    assert json.loads(copy.read_text()) == json.loads(path.read_text())


ROOT = Path(__file__).resolve().parents[1]


def _jupyterlab_save(nb: dict) -> str:
    """What JupyterLab 4 writes when a student runs a notebook and presses Ctrl+S: outputs, execution counts, the
    kernel's full language_info, widget state, cell timing metadata — through nbformat, as jupyter-server does."""
    import copy

    import nbformat

    nb = copy.deepcopy(nb)
    nb["metadata"]["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                                       "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                                       "pygments_lexer": "ipython3", "version": "3.11.7"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                              "version_minor": 0}}
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = n + 1
        cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["ran\n"]}]
        cell["metadata"]["execution"] = {"iopub.execute_input": "2026-12-01T10:00:00.000Z"}
        cell["metadata"]["scrolled"] = True
    return nbformat.writes(nbformat.from_dict(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_repository_git_filter_turns_a_jupyterlab_save_back_into_the_committed_bytes(path):
    """Open → run → save → close in JupyterLab, then git's clean filter (.gitconfig, enabled by the README's one
    setup step): the result must be the committed file byte for byte, cell ids unchanged — `git status` clean."""
    clean = subprocess.run(["git", "config", "-f", str(ROOT / ".gitconfig"), "--get", "filter.nbstripout.clean"],
                           capture_output=True, text=True, check=True).stdout.strip()
    command = clean.replace("python -m", f"{sys.executable} -m", 1)
    saved = _jupyterlab_save(json.loads(path.read_text()))
    assert saved != path.read_text()  # the save really changed the file
    result = subprocess.run(command, shell=True, input=saved, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == path.read_text()


def test_the_readme_setup_step_enables_the_filter_gitattributes_names():
    readme = (ROOT / "README.md").read_text()
    assert "git config --local include.path ../.gitconfig" in readme
    attributes = (ROOT / ".gitattributes").read_text()
    assert "filter=nbstripout" in attributes and "diff=ipynb" in attributes
    for key in ("filter.nbstripout.clean", "filter.nbstripout.smudge", "diff.ipynb.textconv"):
        assert subprocess.run(["git", "config", "-f", str(ROOT / ".gitconfig"), "--get", key],
                              capture_output=True, text=True).stdout.strip(), key
