"""Default locations: ``outputs/<profile>/`` for a reproduction, under the repository (or the working folder when
xcardia is installed elsewhere)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The repository root when running from a checkout (it has ``notebooks/``), else the working folder."""
    root = PACKAGE_DIR.parent
    return root if (root / "notebooks").is_dir() else Path.cwd()


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def default_output_dir(profile: str) -> Path:
    return project_root() / "outputs" / profile
