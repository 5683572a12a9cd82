"""The package's import graph, read from the source (AST, nothing imported): no cycles inside
advflow, the algorithm layer (trainers/) imports nothing of the platform, Ray, MLflow or
DeepSpeed, and the library (platform/) nothing of infra/ or dashboards/. Function-level imports
count: a cycle through a lazy import is still a cycle."""

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


def imported_names(path: Path) -> list[str]:
    """Every dotted name `path` imports, as written: `import a.b` gives a.b, `from a import b`
    gives a and a.b."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use `from advflow...` (one import root)")
    return names


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """advflow modules `path` imports (resolving `from pkg import submodule`), and every other
    top-level package it imports, prefixed '!' (e.g. '!ray')."""
    found: set[str] = set()
    for name in imported_names(path):
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
    assert "advflow.platform.train.methods.afm" in g and "advflow.trainers.afm" in g["advflow.platform.train.methods.afm"]
    assert "advflow.platform.train.methods" in g["advflow.platform.train.loop"]


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


# What the library (platform/) must not depend on: the services' bring-up and the HTML reports.
# Both build on the platform, never the other way round (a job renders a report from what the
# library returns).
PLATFORM_MUST_NOT_IMPORT = ("advflow.infra", "advflow.dashboards")


def platform_violations(path: Path) -> list[str]:
    """The imports of `path` that reach into infra/ or dashboards/, as written (a package such as
    `advflow.infra` counts too, whether or not it is a module of its own)."""
    return sorted({name for name in imported_names(path)
                   if any(name == p or name.startswith(p + ".") for p in PLATFORM_MUST_NOT_IMPORT)})


def test_the_platform_rule_sees_every_form_of_import(tmp_path):
    lines = {"import advflow.infra.local.proc": ["advflow.infra.local.proc"],
             "from advflow.infra.local.proc import free_port": ["advflow.infra.local.proc",
                                                                 "advflow.infra.local.proc.free_port"],
             "from advflow import dashboards": ["advflow.dashboards"],
             "from advflow.dashboards import sweep_report": ["advflow.dashboards", "advflow.dashboards.sweep_report"],
             "def f():\n    from advflow.dashboards.sweep_report import write_report": [
                 "advflow.dashboards.sweep_report", "advflow.dashboards.sweep_report.write_report"],
             "from advflow.platform.net import free_port": [],
             "import advflow.infrastructure_like": []}
    for code, want in lines.items():
        (tmp_path / "m.py").write_text(code + "\n")
        assert platform_violations(tmp_path / "m.py") == want, code


@pytest.mark.parametrize("path", sorted((ROOT / "platform").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_platform_imports_nothing_of_infra_or_dashboards(path):
    bad = platform_violations(path)
    assert not bad, (f"{path.relative_to(ROOT)} imports {bad}: platform/ is the library that infra/ and "
                     "dashboards/ build on; move what both need into platform/ (e.g. platform/net.py)")


def test_data_does_not_depend_on_evaluation_or_tracking():
    g = graph()
    for m, deps in g.items():
        if m.startswith("advflow.platform.data"):
            wrong = sorted(d for d in deps if d.startswith(("advflow.platform.eval", "advflow.platform.tracking",
                                                            "advflow.platform.train")))
            assert not wrong, f"{m} imports {wrong}"
