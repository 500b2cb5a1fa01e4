"""The house rules of CONTRIBUTING.md that a program can check, read from src/martlet's syntax trees: no import
cycle among Martlet's modules, no function over 60 lines, no `_private` name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "martlet"
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imported(module: str, node: ast.AST, known: set[str]) -> list[tuple[str, list[str]]]:
    """(Martlet module imported, names taken from it) for one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "martlet"]
    if not isinstance(node, ast.ImportFrom):
        return []
    assert not node.level, f"{module}: a relative import (Martlet imports by full name)"
    target = node.module or ""
    if target.split(".")[0] != "martlet":
        return []
    found = []
    for alias in node.names:  # `from martlet.x import y` may import the submodule y
        sub = f"{target}.{alias.name}"
        found.append((sub, []) if sub in known else (target, [alias.name]))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle_among_martlet_s_modules():
    """Counting the imports inside functions too: a function-local import only hides a cycle."""
    modules = _modules()
    known = set(modules)
    graph = {name: {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for target, _ in _imported(name, node, known)
                    if target in known and not target.startswith(name + ".")}  # a package's own submodules
             for name, tree in modules.items()}
    assert sum(map(len, graph.values())) > 100  # the imports were found
    assert _cycles(graph) == []


def test_no_function_over_60_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_no_private_name_imported_from_another_module():
    modules = _modules()
    known = set(modules)
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            for target, names in _imported(name, node, known):
                found += [f"{name}: from {target} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__") and target != name]
    assert found == []


def test_the_checks_find_what_they_look_for():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from martlet.train.sft import _attn, uses_gradient_checkpointing\n")
    assert _imported("martlet.train.rlhf", tree.body[0], {"martlet.train.sft"}) == [
        ("martlet.train.sft", ["_attn"]), ("martlet.train.sft", ["uses_gradient_checkpointing"])]
