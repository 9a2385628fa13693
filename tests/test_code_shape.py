"""The code stays readable: no function in moectl/ grows past 80 lines, the engine's core imports
nothing outside core (so a notebook can use it without recipes, files or the CLI), imports sit at
the top of modules, and each concept has one owner (the run folder's file names, the routing
modes, a method's names)."""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize

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


# --------------------------------------------------------------------------- one owner per concept

# Every file and folder name of a run folder (and of a checkpoint or model folder inside it).
RUN_FILES = ("config.yaml", "tokenizer.json", "data.json", ".lock", "metrics.jsonl", "summary.json", "results.json",
             "model.safetensors", "optimizer.pt", "trainer.json", "plan.pt", "meta.json", "convert.json",
             "curves.png", "expert_load.png", "router_entropy.png", "mutual_information.png")
RUN_FOLDERS = ("logs", "tb", "eval", "checkpoints", "latest", "rng")
PATH_TEXT = re.compile(r"^[\w.]+(/[\w.]+)*$")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            out.add(id(first.value))
    return out


def _run_file_literals() -> dict[str, set[str]]:
    """name -> the modules that spell it as a path: a string that is a path holding it, or an operand
    of `/` (prose in messages and docstrings does not count)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        prose = _docstrings(tree)
        module = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                if PATH_TEXT.match(node.value):
                    for name in set(node.value.split("/")) & set(RUN_FILES + RUN_FOLDERS):
                        if name in RUN_FILES or "/" in node.value:
                            found.setdefault(name, set()).add(module)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and side.value in RUN_FILES + RUN_FOLDERS:
                        found.setdefault(side.value, set()).add(module)
    return found


def test_each_run_folder_name_is_spelled_in_one_module():
    found = _run_file_literals()
    assert all(modules == {"moectl/rundir.py"} for modules in found.values()), {
        k: sorted(v) for k, v in found.items() if v != {"moectl/rundir.py"}}
    assert set(RUN_FILES) <= set(found)


def test_the_model_forward_takes_a_routing_mode_not_probes():
    from moectl.core import MoETransformer

    params = [p for p in inspect.signature(MoETransformer.forward).parameters if p != "self"]
    assert len(params) <= 6 and "mode" in params, params


def _names(path):
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME:
            yield tok.start[0], tok.string


def test_competition_is_named_only_in_its_module():
    """A method's own analysis reaches evaluation through the generic variant hooks: no module but
    core/compete.py (and the one line that registers it) names competition."""
    seen = [(str(p.relative_to(REPO)), line, name) for p in sorted(PACKAGE.rglob("*.py"))
            if p != PACKAGE / "core" / "compete.py" for line, name in _names(p) if "compet" in name.lower()]
    registration = [s for s in seen if s[0] == "moectl/core/__init__.py"]
    assert len(registration) == 1 and len(seen) == 1, seen


def _local_imports_of_moectl():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "cli":   # commands import lazily: --help stays instant
            continue
        tree = ast.parse(path.read_text())
        local = {id(n): n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in local.values():
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "moectl" or n.startswith("moectl.") for n in names):
                yield f"{path.relative_to(REPO)}:{node.lineno}"


def test_imports_are_at_module_level():
    """The imports at the top of a module show what it depends on; a function imports moectl's own
    modules only for an optional extra (the Triton kernels import triton)."""
    local = list(_local_imports_of_moectl())
    assert len(local) <= 10, local
    assert all(place.startswith("moectl/core/experts.py") for place in local), local
