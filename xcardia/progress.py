"""Progress bars as text, never as widgets.

``tqdm.auto`` draws an ipywidget in Jupyter; its state lives in the kernel, so a notebook reopened later (or after a
kernel restart) shows "Error displaying widget: model not found" where each bar was (issue 21). A text bar updates
in place in JupyterLab as well as in a terminal, and what is saved with the notebook is its last line, which reads
the same after a reopen.
"""

from __future__ import annotations

import sys


def bar(iterable=None, **kwargs):
    """A text ``tqdm`` bar on stderr, updated at most once a second (a saved notebook keeps few lines)."""
    from tqdm.std import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)
