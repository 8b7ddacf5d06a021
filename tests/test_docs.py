"""Docs stay in step with the code: the schema card, the README's commands and CI."""

from __future__ import annotations

import re
from pathlib import Path

from xcardia.schema import schema_markdown

REPO = Path(__file__).resolve().parents[1]


def test_manifest_schema_card_matches_the_schema_in_code():
    assert schema_markdown() in (REPO / "data_cards" / "manifest_schema.md").read_text()


def readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0], flags=re.S)


def test_readme_has_two_self_sufficient_commands():
    reproduce, test = readme_commands()[:2]
    for command in (reproduce, test):
        assert "python3.11 -m venv" in command and "pip install -r requirements.txt" in command
    assert "python -m xcardia reproduce" in reproduce
    assert "python -m pytest" in test


def test_ci_runs_exactly_the_readmes_test_command():
    test_command = readme_commands()[1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_requirements_pin_torch_2_13_0():
    assert "torch==2.13.0" in (REPO / "requirements.txt").read_text().splitlines()
