"""The layers of the code: nothing imports a module of a higher floor at run time.

Floors, ground up (docs/architecture.md draws them):

0. ``pgmux.protocol``: the wire protocol, sans-IO, stdlib only
1. ``pgmux.proxy.base``: logging, tasks, ids, statistics, the ledger, sd_notify
2. ``pgmux.proxy.config``: settings, YAML and pgbouncer.ini readers, users, hba, TLS
3. ``pgmux.proxy.core``: states, limits, control flags, cancel keys, link protocols
4. ``pgmux.proxy.datapath``: client, server, pool, replies, translator, session state
5. ``pgmux.proxy.registry``, ``pgmux.proxy.login``: the directory and the login
6. ``pgmux.proxy.console``, ``pgmux.proxy.metrics``: what reads the state
7. ``pgmux.proxy.daemon``: listener, janitor, peers, lifecycle
8. ``pgmux.proxy.supervisor``, ``cli``, ``convert``, ``pgmux.__main__``

An import under ``if TYPE_CHECKING:`` is an annotation, not a run-time import,
and may point anywhere. Every other import counts, also one inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "pgmux": ROOT / "pgmux",
    "pgmux.protocol": ROOT / "protocol",
    "pgmux.proxy": ROOT / "proxy",
}

FLOORS: list[tuple[str, int]] = [
    # (module or package prefix, floor); the longest matching prefix wins
    ("pgmux.protocol", 0),
    ("pgmux.tempgres", 0),
    ("pgmux.hubsim", 0),
    ("pgmux.proxy.base", 1),
    ("pgmux.proxy.config", 2),
    ("pgmux.proxy.core", 3),
    ("pgmux.proxy.datapath", 4),
    ("pgmux.proxy.registry", 5),
    ("pgmux.proxy.login", 5),
    ("pgmux.proxy.console", 6),
    ("pgmux.proxy.metrics", 6),
    ("pgmux.proxy.daemon", 7),
    ("pgmux.proxy.supervisor", 8),
    ("pgmux.proxy.cli", 8),
    ("pgmux.proxy.convert", 8),
    ("pgmux.__main__", 8),
    ("pgmux.proxy", 0),  # the package itself: an empty __init__
    ("pgmux", 0),  # pgmux/__init__.py: the version only
]


def floor_of(module: str) -> int:
    best, floor = "", None
    for prefix, level in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best, floor = prefix, level
    assert floor is not None, f"{module} belongs to no floor: add it to FLOORS"
    return floor


def all_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            relative = path.relative_to(directory).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "pgmux" and parts and parts[0] in ("protocol", "proxy"):
                continue
            modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The pgmux modules `name` imports at run time (packages included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    result: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [base]
            targets += [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known:
                result.add(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                parent = target.rpartition(".")[0]
                while parent:
                    if parent in known:
                        result.add(parent)
                    parent = parent.rpartition(".")[0]
    result.discard(name)
    return result


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_every_module_has_a_floor() -> None:
    for name in all_modules():
        floor_of(name)


def test_no_module_imports_a_higher_floor() -> None:
    upward = [
        f"{name} (floor {floor_of(name)}) imports {target} (floor {floor_of(target)})"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if floor_of(target) > floor_of(name)
    ]
    assert not upward, "\n".join(upward)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_runtime_import_circle() -> None:
    graph = import_graph()
    # a package's __init__ is run by importing any of its modules: that edge is
    # not a circle of its own making
    edges = {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in graph.items()
    }
    cycle = _find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The check itself must be able to fail: a base module importing the daemon.
    module = tmp_path / "bad.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pgmux.proxy.registry import Registry\n"
        "def late():\n    from pgmux.proxy.daemon import lifecycle\n"
    )
    found = imports_of(
        "pgmux.proxy.base.bad", module, {"pgmux.proxy.registry", "pgmux.proxy.daemon.lifecycle"}
    )
    assert found == {"pgmux.proxy.daemon.lifecycle"}
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("floor", range(9))
def test_each_module_imports_alone(floor: int) -> None:
    """`python -c 'import X'` in a fresh interpreter, for every module: an
    import circle that only some import orders survive shows up here."""
    names = [name for name in all_modules() if floor_of(name) == floor and name != "pgmux.__main__"]
    script = (
        "import importlib, subprocess, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True,"
        " text=True)\n"
        "    if r.returncode:\n"
        "        bad.append(name + ': ' + r.stderr.strip().splitlines()[-1])\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_source_module_over_600_lines() -> None:
    long = {
        name: n
        for name, path in all_modules().items()
        if (n := len(path.read_text().splitlines())) > 600
    }
    assert not long, long
