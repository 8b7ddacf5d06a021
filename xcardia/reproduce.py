"""Run every numbered notebook headless through papermill: ``python -m xcardia reproduce --profile P``.

Notebooks ``notebooks/NN_name.ipynb`` run in numeric order with the parameters ``profile``, ``seed``,
``output_dir`` and ``data`` injected into their ``parameters`` cell; executed copies go to
``<out>/notebooks/``, figures to ``<out>/figures/``, numbers to ``<out>/metrics.json`` and ``<out>/summary.md``.
The first failing notebook stops the run with its name and failing cell. New notebooks need no change here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from xcardia.config import get_profile
from xcardia.errors import XcardiaError
from xcardia.paths import default_output_dir, notebooks_dir, project_root
from xcardia.results import read_metrics, update_metrics, write_summary

NOTEBOOK_PATTERN = re.compile(r"^(\d+)_.+\.ipynb$")


class NotebookFailed(XcardiaError):
    """A notebook raised during execution; the message names the notebook and the failing cell."""


def list_notebooks(directory: str | os.PathLike | None = None) -> list[Path]:
    """The numbered notebooks of ``directory`` in numeric order."""
    directory = Path(directory) if directory else notebooks_dir()
    found = [p for p in directory.iterdir() if NOTEBOOK_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: (int(NOTEBOOK_PATTERN.match(p.name).group(1)), p.name))


def _select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = []
    for key in only:
        key = key.strip()
        hits = [p for p in notebooks if p.name.startswith(key) or p.stem == key
                or (key.isdigit() and int(NOTEBOOK_PATTERN.match(p.name).group(1)) == int(key))]
        if not hits:
            raise XcardiaError(f"--only {key!r} matches no notebook; available: {', '.join(p.name for p in notebooks)}")
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen, key=notebooks.index)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(),
                               capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def execute_notebook(notebook: Path, output: Path, parameters: dict, timeout_s: int | None) -> None:
    """Execute one notebook with papermill (kernel ``python3``) and raise :class:`NotebookFailed` on error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, kernel_name="python3",
            execution_timeout=timeout_s, progress_bar=False, cwd=str(notebook.parent), log_output=False,
        )
    except Exception as exc:  # a timeout or a dead kernel: the same one-line message, naming notebook and cell
        if isinstance(exc, PapermillExecutionError):
            raise _failed(notebook, output, exc) from None
        name = type(exc).__name__
        if name in ("CellTimeoutError", "DeadKernelError", "TimeoutError") or "nbclient" in type(exc).__module__:
            cell = _last_started_cell(output, notebook, str(exc))
            what = ("ran past the per-cell limit of "
                    f"{timeout_s} s (rerun with a larger --cell-timeout, or none: finished runs are reused)"
                    if "Timeout" in name else "lost its kernel (out of memory? rerun: finished runs are reused)")
            raise NotebookFailed(f"notebook {notebook.name} {what} in cell {cell} — the partly executed notebook is "
                                 f"{output}") from None
        raise


def _last_started_cell(output: Path, notebook: Path, message: str = "") -> str:
    """Index of the cell that was running (best effort): from nbclient's preview of the cell in ``message``, else
    the first code cell papermill left unfinished in ``output``."""
    import ast

    import nbformat

    preview = None
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Here is a preview of the cell contents"):
            body = [entry for entry in lines[i + 1:] if entry.strip() and not set(entry.strip()) <= {"-"}]
            try:
                first = ast.literal_eval(body[0]) if body else None
                preview = first[0] if isinstance(first, list) and first else None
            except (ValueError, SyntaxError):
                preview = body[0] if body else None
            break
    for path in (output, notebook):
        try:
            nb = nbformat.read(str(path), as_version=4)
        except Exception:  # noqa: BLE001 - the message must still be written
            continue
        for i, cell in enumerate(nb.cells):
            if cell.get("cell_type") != "code":
                continue
            if preview is not None and cell.source.startswith(preview):
                return str(i)
            if preview is None and cell.get("metadata", {}).get("papermill", {}).get("status") == "running":
                return str(i)
    return "unknown"


def _failed(notebook: Path, output: Path, exc) -> NotebookFailed:
    return NotebookFailed(
        f"notebook {notebook.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
        f"{exc.ename}: {exc.evalue.splitlines()[0] if exc.evalue else ''} — the executed notebook with the error "
        f"is {output}"
    )


def time_breakdown(out_dir: Path, notebooks: dict) -> dict:
    """Where a reproduction's time went (issue 23.1): each notebook, each pretraining run (its ``run.json``), and
    the encoding, fine-tuning and k-shot time per init (``finetune/timing.json``, ``fewshot/kshot_timing.json``,
    written when the part was computed; a reused part keeps the time it took when it ran)."""
    import json

    out = {"notebooks_s": dict(notebooks), "pretraining_runs_s": {}}
    for run_json in sorted((out_dir / "runs").glob("*/run.json")):
        try:
            out["pretraining_runs_s"][run_json.parent.name] = round(float(json.loads(run_json.read_text())
                                                                           .get("wall_time_s", float("nan"))), 1)
        except (ValueError, OSError):
            continue
    for part, name in (("finetune", "timing.json"), ("fewshot", "kshot_timing.json")):
        path = out_dir / part / name
        if path.exists():
            out[part] = json.loads(path.read_text())
    return out


def reproduce(profile: str = "cpu", out: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
              seed: int = 0, only: list[str] | None = None, notebooks: str | os.PathLike | None = None,
              log=print, cell_timeout_s: int | None = -1) -> Path:
    """Execute the numbered notebooks for ``profile`` and return the output folder.

    Args:
        profile: ``smoke``, ``cpu`` or ``paper``.
        out: output folder (default ``outputs/<profile>``).
        data: a real manifest or cohort folder to use instead of the synthetic cohort.
        seed: the seed passed to every notebook.
        only: run only these notebooks (numbers or names).
        notebooks: folder holding the notebooks (default: the repository's ``notebooks/``).
        log: where progress lines go.
        cell_timeout_s: per-cell limit in seconds (None: no limit); -1 (default): the profile's.

    Raises:
        NotebookFailed: at the first notebook that fails.
    """
    prof = get_profile(profile)
    out_dir = Path(out) if out else default_output_dir(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    chosen = _select(list_notebooks(notebooks), only)
    if not chosen:
        raise XcardiaError(f"no numbered notebooks found in {notebooks or notebooks_dir()}")
    data = str(Path(data).resolve()) if data else None
    parameters = {"profile": profile, "seed": seed, "output_dir": str(out_dir), "data": data, "interactive": False}
    start = time.perf_counter()
    timings = dict(read_metrics(out_dir).get("run", {}).get("notebook_wall_time_s", {}))
    for nb in chosen:
        log(f"[xcardia] running {nb.name} (profile {profile}) ...")
        t0 = time.perf_counter()
        limit = prof.notebook_timeout_s if cell_timeout_s == -1 else cell_timeout_s
        execute_notebook(nb, out_dir / "notebooks" / nb.name, parameters, limit)
        timings[nb.name] = round(time.perf_counter() - t0, 1)
        log(f"[xcardia]   done in {timings[nb.name]:.0f} s")
    command = f"python -m xcardia reproduce --profile {profile}" + (f" --data {data}" if data else "")
    update_metrics(out_dir, "timing", time_breakdown(out_dir, timings))
    update_metrics(out_dir, "run", {
        "profile": profile, "seed": seed, "commit": _git_commit(), "command": command,
        "python": sys.version.split()[0], "wall_time_s": round(time.perf_counter() - start, 1),
        "notebook_wall_time_s": timings,
    })
    summary = write_summary(out_dir)
    log(f"[xcardia] executed notebooks: {out_dir / 'notebooks'}")
    log(f"[xcardia] figures:            {out_dir / 'figures'}")
    log(f"[xcardia] metrics and summary: {out_dir / 'metrics.json'}, {summary}")
    return out_dir
