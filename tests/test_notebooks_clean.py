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
