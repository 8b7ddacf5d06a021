"""The package's shape (issue 14): imports point down, no path hacks, one home for a run's file names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xcardia"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the xcardia modules it imports anywhere (top level or inside a function)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "xcardia":
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    deps.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "xcardia")
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    """Counting imports inside functions too: a lazy import that closes a loop is still a cycle."""
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("low, high", [
    ("xcardia.schema", "xcardia.cohort.generate"),  # real cohorts and models read the schema without the renderer
    ("xcardia.data.manifest", "xcardia.cohort.generate"),
    ("xcardia.config", "xcardia.pretrain"),  # configuration holds specs, not engines
    ("xcardia.config", "xcardia.finetune"),
    ("xcardia.losses", "xcardia.pretrain"),
    ("xcardia.run_folder", "xcardia.pretrain"),
])
def test_lower_layers_never_reach_higher_ones(low, high):
    graph = import_graph()
    reach, todo = set(), [low]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in reach:
                reach.add(dep)
                todo.append(dep)
    assert high not in reach, f"{low} reaches {high}"


def test_no_module_edits_sys_path():
    offenders = [p.name for p in _modules().values() if "sys.path" in p.read_text()]
    assert offenders == []


def test_only_the_run_folder_spells_the_file_names_of_a_run():
    names = ('"checkpoint.pt"', '"selected.pt"', '"encoder_last.pt"', '"run.json"', '"log.json"', '"log.csv"')
    offenders = {p.relative_to(PACKAGE.parent).as_posix(): [n for n in names if n in p.read_text()]
                 for p in _modules().values() if p.name != "run_folder.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
