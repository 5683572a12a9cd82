"""The package's import graph, read from the source (AST, nothing imported): no cycles inside
advflow, and the algorithm layer (trainers/) imports nothing of the platform, Ray, MLflow or
DeepSpeed. Function-level imports count: a cycle through a lazy import is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import root, as pyproject.toml maps them.
PACKAGES = {"platform": "advflow.platform", "trainers": "advflow.trainers", "dashboards": "advflow.dashboards",
            "infra": "advflow.infra"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, dotted in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([dotted, *parts])] = path
    return out


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """advflow modules `path` imports (resolving `from pkg import submodule`), and every other
    top-level package it imports, prefixed '!' (e.g. '!ray')."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use `from advflow...` (one import root)")
        for name in names:
            if name.startswith("advflow."):
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in known:
                    found.add(name)
            else:
                found.add("!" + name.split(".")[0])
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {d for d in imports_of(p, known) if not d.startswith("!") and d != m} for m, p in known.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walker_sees_the_package():
    g = graph()
    assert "advflow.platform.train.worker" in g and "advflow.trainers.afm" in g["advflow.platform.train.worker"]


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted((ROOT / "trainers").rglob("*.py")), ids=lambda p: p.name)
def test_trainers_import_nothing_of_the_platform(path):
    known = modules()
    bad = sorted(d for d in imports_of(path, known)
                 if d.startswith(("advflow.platform", "advflow.infra", "advflow.dashboards"))
                 or d in ("!ray", "!mlflow", "!deepspeed", "!boto3", "!s3fs", "!optuna"))
    assert not bad, f"{path.name} imports {bad}: trainers/ is the Ray-free algorithm layer"


def test_data_does_not_depend_on_evaluation_or_tracking():
    g = graph()
    for m, deps in g.items():
        if m.startswith("advflow.platform.data"):
            wrong = sorted(d for d in deps if d.startswith(("advflow.platform.eval", "advflow.platform.tracking",
                                                            "advflow.platform.train")))
            assert not wrong, f"{m} imports {wrong}"
