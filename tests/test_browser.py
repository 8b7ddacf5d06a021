"""Notebook 01 in a real browser: JupyterLab on 127.0.0.1 with a token, headless Debian Chromium driven by Playwright
(`executable_path` points at the system browser; `playwright install` is never used — it downloads browsers).

It opens the notebook, runs all cells, asserts that no cell printed an error, moves the slice viewer's slider and
asserts that the image changed, and saves screenshots under the test's temporary folder. Skipped, with the reason,
where Chromium or Playwright is not installed (`.ci/run` installs both)."""

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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 01 whose outputs go to the temporary folder."""
    work = tmp_path / "lab"
    work.mkdir()
    nb = json.loads((REPO / "notebooks" / "01_data.ipynb").read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = "".join(cell["source"]).replace("output_dir = None", f"output_dir = {str(tmp_path / 'out')!r}")
    (work / "01_data.ipynb").write_text(json.dumps(nb))
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.open_browser=False"]
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


def test_notebook_01_runs_in_jupyterlab_and_its_slice_viewer_moves(jupyterlab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    url, token, _ = jupyterlab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/01_data.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
        page.locator(".jp-Notebook").first.click()
        page.keyboard.press("Escape")
        page.evaluate("() => window.jupyterapp && window.jupyterapp.commands.execute('notebook:run-all-cells')")
        if not page.evaluate("() => !!window.jupyterapp"):  # older JupyterLab: the menu
            page.get_by_role("menuitem", name="Run").click()
            page.get_by_text("Run All Cells", exact=True).click()
        # every code cell finished: no "[*]" prompt left and the kernel idle
        deadline = time.time() + 150
        while time.time() < deadline:
            busy = page.locator(".jp-InputPrompt", has_text="[*]").count()
            idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count()
            if busy == 0 and idle and page.locator(".jp-InputPrompt", has_text="[1]").count():
                break
            time.sleep(1)
        page.screenshot(path=str(tmp_path / "notebook_01_after_run.png"), full_page=False)
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                              has_text="Traceback")
        assert errors.count() == 0, errors.first.inner_text()[:2000]
        assert page.locator(".jp-InputPrompt", has_text="[*]").count() == 0, "cells still running after 150 s"

        slider = page.locator(".widget-slider .noUi-handle, .widget-slider input[type='range']").first
        slider.scroll_into_view_if_needed()
        image = page.locator(".widget-output img, .jp-OutputArea-output img").filter(has=None)
        viewer_image = slider.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')]//img").first
        before = viewer_image.get_attribute("src")
        slider.click()
        for _ in range(4):
            page.keyboard.press("ArrowRight")
        page.wait_for_timeout(2000)
        after = viewer_image.get_attribute("src")
        page.screenshot(path=str(tmp_path / "slice_viewer_moved.png"))
        assert image.count() > 0 and before and after and before != after, "the slice viewer did not redraw"
        browser.close()
