"""Notebooks 01–03 in a real browser, as a student meets them: JupyterLab on 127.0.0.1 with a token, headless Debian
Chromium driven by Playwright (`executable_path` points at the system browser; `playwright install` is never used —
it downloads browsers).

The test cannot pass when nothing ran: it waits until the kernel reports itself idle (the notebook's own session, read
from JupyterLab's model and from the server's REST API), then asserts that every code cell it ran has an execution
count and no error output, and reads what those cells printed. It covers notebook 01 (its slice viewer moves), the
hand-run step of notebook 02 (the CLIP and NW checks print their numbers), and notebook 03's NW explorer (another test
patient gives another picture). It saves the notebooks, reopens one and asserts that no widget says "model not
found", and checks that `git status` is clean through the repository's notebook filter. Notebooks 02 and 03 reuse a
the session's smoke reproduction (its trained runs). Skipped, with the reason, where Chromium or Playwright
is not installed (`.ci/run` installs both)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
#: Flags for a sandboxed CI machine without network (background services would try to reach Google and fail).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
NOTEBOOKS = ("01_data.ipynb", "02_pretraining.ipynb", "03_nw_latent_axes.ipynb")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install chromium)"),
]

#: The open notebook's state, read from JupyterLab's own model: per code cell its index, execution count, output
#: types and text; the kernel's status as the notebook's session sees it.
NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model) { return null; }
  const kernel = panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  const model = panel.content.model.cells;
  for (let i = 0; i < model.length; i++) {
    const cell = model.get(i);
    if (cell.type !== 'code') { continue; }
    const outputs = cell.outputs.toJSON();
    const text = outputs.map(o => [].concat(o.text || (o.data && o.data['text/plain']) || []).join('')).join('\\n');
    cells.push({index: i, count: cell.executionCount, types: outputs.map(o => o.output_type), text: text,
                ename: outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)});
  }
  return {kernel: kernel ? kernel.status : 'none', path: panel.context.path, cells: cells};
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=work, capture_output=True, text=True, env=env, check=check)


@pytest.fixture
def jupyterlab(tmp_path, smoke_reproduction):
    """A JupyterLab server on 127.0.0.1 over a git repository holding notebooks 01–03 (outputs into the session's
    smoke reproduction), committed through the repository's notebook filter as the README sets it up."""
    work = tmp_path / "lab"
    work.mkdir()
    out = smoke_reproduction  # its cohort and trained runs are reused (as the nbval reruns of 03–06 reuse them)
    for name in NOTEBOOKS:
        nb = json.loads((REPO / "notebooks" / name).read_text())
        for cell in nb["cells"]:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                cell["source"] = "".join(cell["source"]).replace("output_dir = None", f"output_dir = {str(out)!r}")
        (work / name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    for name in (".gitattributes", ".gitconfig", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    _git(work, "init", "-q")
    _git(work, "config", "--local", "include.path", "../.gitconfig")  # the README's one setup step
    _git(work, "add", ".")
    _git(work, "commit", "-q", "-m", "notebooks")
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.open_browser=False",
               "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root; JupyterLab refuses root without it
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
    yield url, token, work
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def _rest_kernel_state(url: str, token: str, path: str) -> str:
    """The execution state the server reports for the kernel of the notebook at ``path`` ('' without a session)."""
    sessions = json.loads(urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5).read())
    for session in sessions:
        if session.get("path", "").endswith(path) and session.get("kernel"):
            return session["kernel"].get("execution_state", "")
    return ""


def _wait(page, url, token, name, until, timeout_s: float, what: str) -> dict:
    """Poll the notebook's state until ``until(state)`` holds with the kernel idle both in JupyterLab and on the
    server; fail naming ``what`` and the last state otherwise."""
    deadline, state = time.time() + timeout_s, None
    while time.time() < deadline:
        state = page.evaluate(NOTEBOOK_STATE)
        if state and state["kernel"] == "idle" and _rest_kernel_state(url, token, name) == "idle" and until(state):
            return state
        time.sleep(1)
    summary = None if state is None else {"kernel": state["kernel"], "ran": sum(c["count"] is not None for c in state["cells"]),
                                          "code cells": len(state["cells"])}
    pytest.fail(f"{name}: {what} within {timeout_s:.0f} s; last state {summary}")


def _open(page, url, token, name) -> dict:
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")  # reset: only this notebook open, no restored tabs
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # "No Kernel | Initializing" is not idle: wait for the notebook's own kernel, as the server reports it too
    return _wait(page, url, token, name, lambda s: True, 90, "the kernel did not become idle")


def _run(page, url, token, name, command: str, cells_to_run, timeout_s: float) -> dict:
    """Run ``command`` (e.g. run all) and wait until every code cell in ``cells_to_run(state)`` has an execution
    count; then assert none of them raised."""
    page.evaluate(f"() => window.jupyterapp.commands.execute('{command}')")
    state = _wait(page, url, token, name, lambda s: all(c["count"] is not None for c in cells_to_run(s)), timeout_s,
                  "not every cell ran")
    errors = [f"cell {c['index']}: {c['ename']}" for c in cells_to_run(state) if c["ename"]]
    assert not errors, f"{name}: {errors}"
    return state


def _select_cell(page, index: int) -> None:
    page.evaluate(f"() => {{ window.jupyterapp.shell.currentWidget.content.activeCellIndex = {index}; }}")


def _image_after_slider(page, slider_index: int, moves: int):
    """Move the ``slider_index``-th widget slider by ``moves`` steps; return the src of the image its output shows
    before and after."""
    slider = page.locator(".widget-slider .noUi-handle, .widget-slider input[type='range']").nth(slider_index)
    slider.scroll_into_view_if_needed()
    image = slider.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')]//img").first
    image.wait_for(timeout=30_000)
    before = image.get_attribute("src")
    slider.click()
    for _ in range(moves):
        page.keyboard.press("ArrowRight")
    for _ in range(60):  # the kernel redraws: wait for a new picture
        page.wait_for_timeout(500)
        after = image.get_attribute("src")
        if after and after != before:
            break
    return before, after


#: ``XCARDIA_BROWSER_REPEAT=3`` runs the test three times in one session (each on a fresh server and fresh copies), the
#: check that it is not flaky; CI runs it once.
REPEAT = int(os.environ.get("XCARDIA_BROWSER_REPEAT", "1"))


@pytest.mark.parametrize("attempt", range(REPEAT))
def test_notebooks_01_to_03_run_in_jupyterlab_reopen_without_widget_errors_and_leave_git_clean(jupyterlab, tmp_path,
                                                                                                attempt):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    url, token, work = jupyterlab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        # 01: every cell runs, the last one too, and the slice viewer redraws when its slider moves
        name = "01_data.ipynb"
        _open(page, url, token, name)
        state = _run(page, url, token, name, "notebook:run-all-cells", lambda s: s["cells"], 300)
        counts = [c["count"] for c in state["cells"]]
        assert all(isinstance(c, int) and c > 0 for c in counts), counts
        assert max(counts) == len(counts), f"{name}: {len(counts)} code cells but execution counts {counts}"
        assert state["cells"][-1]["count"] == len(counts), "the last code cell did not run last"
        before, after = _image_after_slider(page, 0, 4)
        page.screenshot(path=str(tmp_path / "01_slider_moved.png"))
        assert before and after and before != after, "notebook 01: the slice viewer did not redraw"
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")

        # 02: the whole notebook (its runs are reused); the hand-run step prints its checks
        name = "02_pretraining.ipynb"
        _open(page, url, token, name)
        state = _run(page, url, token, name, "notebook:run-all-cells", lambda s: s["cells"], 480)
        printed = "\n".join(c["text"] for c in state["cells"])
        assert "diagonal mean − off-diagonal mean" in printed and "effective supports 1/Σw²" in printed, printed[-2000:]
        assert "reusing the finished run" in printed  # it ran on the reproduction's trained runs
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")

        # 03: up to and including the NW explorer; another test patient gives another picture
        name = "03_nw_latent_axes.ipynb"
        state = _open(page, url, token, name)
        explorer = next(c["index"] for c in state["cells"]
                        if "figures.nw_explorer(" in page.evaluate(
                            f"() => window.jupyterapp.shell.currentWidget.content.model.cells.get({c['index']}).sharedModel.getSource()"))
        _select_cell(page, explorer)
        _run(page, url, token, name, "notebook:run-all-above", lambda s: [c for c in s["cells"] if c["index"] < explorer],
             480)
        _select_cell(page, explorer)
        _run(page, url, token, name, "notebook:run-cell", lambda s: [c for c in s["cells"] if c["index"] <= explorer],
             120)
        before, after = _image_after_slider(page, 0, 3)
        page.screenshot(path=str(tmp_path / "03_explorer_moved.png"))
        assert before and after and before != after, "notebook 03: the NW explorer shows the same picture for another patient"
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_timeout(2000)

        # reopen a saved notebook in a fresh page: its widgets and progress read, none says "model not found"
        page.close()
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _open(page, url, token, "01_data.ipynb")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(tmp_path / "01_reopened.png"), full_page=True)
        assert page.get_by_text("model not found").count() == 0, "a reopened notebook shows a widget error"
        browser.close()

    # open → run → save leaves git clean through the repository's filter (outputs, counts and added metadata dropped)
    for name in NOTEBOOKS:
        saved = json.loads((work / name).read_text())
        assert any(c.get("outputs") for c in saved["cells"] if c["cell_type"] == "code"), f"{name} was saved without outputs"
    diff = _git(work, "diff", "--no-textconv", "--stat").stdout  # worktree through the clean filter vs the commit
    assert diff == "", f"run and save changed what git would commit:\n{diff}"
    # git lists a saved notebook whose size changed without running the filter (README); `git add` stages nothing
    _git(work, "add", "-A")
    status = _git(work, "status", "--porcelain").stdout
    assert status == "", f"git status after run, save and `git add`:\n{status}\n{_git(work, 'diff', '--cached').stdout[:3000]}"
