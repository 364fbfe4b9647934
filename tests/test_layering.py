"""Dependencies point one way (docs/architecture.md, "Layering"), and no subpackage imports itself in a circle.

Every import counts — at module level or inside a function — except those under ``if TYPE_CHECKING:`` (they never
run). ``errors`` and ``schema`` are the bottom layer every package may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "taskmllm"
BOTTOM = {"errors", "schema"}
#: package -> the top-level parts of taskmllm it may import (besides itself and the bottom layer)
ALLOWED = {
    "model": set(),
    "experts": set(),
    "data": {"model", "experts"},
}
#: package -> the parts it must never import (the rest is allowed)
FORBIDDEN = {
    "router": {"training", "eval", "demo", "cli", "predict"},
    "eval": {"training"},
}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path) -> set[str]:
    """Every ``taskmllm...`` module ``path`` imports (function-level too; ``TYPE_CHECKING`` blocks skipped)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("taskmllm"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("taskmllm"))
    return found


def _parts(modules: set[str]) -> set[str]:
    """The top-level parts of taskmllm (``model``, ``router``, ``zoo`` ...) that ``modules`` belong to."""
    return {m.split(".")[1] for m in modules if m.count(".") >= 1}


def layering_violations(root: Path = ROOT) -> dict[str, list[str]]:
    """File -> the forbidden parts it imports, for every rule above."""
    bad = {}
    for package in sorted(set(ALLOWED) | set(FORBIDDEN)):
        for path in (root / package).rglob("*.py"):
            parts = _parts(imported_modules(path)) - {package} - BOTTOM
            wrong = parts - ALLOWED[package] if package in ALLOWED else parts & FORBIDDEN[package]
            if wrong:
                bad[str(path.relative_to(root))] = sorted(wrong)
    return bad


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Cycles of module imports inside each subpackage (a module importing a module that imports it back)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name}
             for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt.split(".")[:2] != node.split(".")[:2]:
                continue  # across subpackages: layering's business
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package's __init__ re-exporting its modules is not a cycle of code: drop cycles through an __init__
    inits = {_module_name(p, root) for p in root.rglob("__init__.py")}
    return [c for c in cycles if not inits & set(c)]


def test_packages_import_only_what_the_layering_allows():
    assert not layering_violations(), layering_violations()


def test_no_import_cycles_inside_a_subpackage():
    assert not import_cycles(), import_cycles()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("package, line", [
    ("model", "from taskmllm.experts import EXPERTS"),
    ("experts", "import taskmllm.router.router"),
    ("data", "from taskmllm.router.pipeline import Pipeline"),
    ("router", "from taskmllm.training.train import train"),
    ("router", "def f():\n    from taskmllm.eval.suites import run_shapes\n"),
    ("eval", "from taskmllm import training"),
])
def test_the_checker_sees_each_forbidden_import(tmp_path, package, line):
    root = tmp_path / "taskmllm"
    _write(root, {f"{package}/x.py": line + "\n", f"{package}/ok.py": "from taskmllm.errors import ConfigError\n"})
    assert list(layering_violations(root)) == [f"{package}/x.py"]


def test_the_checker_sees_a_cycle_and_ignores_type_checking(tmp_path):
    root = tmp_path / "taskmllm"
    _write(root, {"model/a.py": "from taskmllm.model.b import f\n",
                  "model/b.py": "def f():\n    from taskmllm.model import a\n",
                  "model/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from taskmllm.model.d import D\n",
                  "model/d.py": "from taskmllm.model.c import C\n"})
    assert import_cycles(root) == [["taskmllm.model.a", "taskmllm.model.b", "taskmllm.model.a"]]
