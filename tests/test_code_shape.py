"""The code stays readable: no function in moectl/ grows past 80 lines, and the engine's core
imports nothing outside core (so a notebook can use it without recipes, files or the CLI)."""

from __future__ import annotations

import ast

from tests.conftest import REPO

PACKAGE = REPO / "moectl"


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    long = [(str(p), name, n) for p, name, n in _functions() if n >= 80]
    assert not long, f"split these functions: {long}"


def test_core_imports_only_core():
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert not name.startswith("moectl") or name.startswith("moectl.core") or name == "moectl", \
                    f"{path.relative_to(REPO)} imports {name}"
