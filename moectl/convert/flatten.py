"""moectl's engine as one flat folder of modules, the form transformers' remote-code loader loads.

The loader (`trust_remote_code=True`) copies the modeling file of a folder and, recursively, every
file a `from .name import ...` line of it names, into one package; it follows nothing else. So each
module of `moectl/core/` (and each plugin module a model's parts come from) is written as one file,
named after its dotted name (`moectl.core.routers.topk` -> `moectl_core_routers_topk.py`), with its
imports of those modules rewritten mechanically (found with `ast`, every line else untouched):

    from moectl.core.x import a, b as c   ->  from .moectl_core_x import a, b as c
    from moectl.core import x             ->  from . import moectl_core_x as x      (x a module)
    import moectl.core.x as y             ->  from . import moectl_core_x as y
    import moectl.core                    ->  from . import moectl_core             (the name moectl unused)

A module import (`from . import name`) is invisible to the loader, so the wrapper (`modeling_moectl.py`)
imports every module that no `from .name import` line reaches. Anything the folder would not hold
is refused: relative imports and moectl modules other than the engine's in a plugin, imports of the
plugin's own package, a part defined where its source cannot be read.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import moectl.core
from moectl.core import registry
from moectl.core.config import PARTS, ModelArgs
from moectl.errors import MoectlError

ENGINE = "moectl.core"
WRAPPER = "modeling_moectl"
PREFIX = "model."   # the wrapper holds the engine as `model`: the folder's tensors are the engine's, prefixed
TEMPLATE = Path(__file__).parent / "remote" / f"{WRAPPER}.py"
GENERATED = "# moectl: generated imports\n"
WHAT = {"router": "router", "block": "block kind", "variant": "routed-layer variant"}
PLUGIN_HINT = ("the exported folder holds the source of each plugin module a model's parts come from: define the "
               "part at the top level of a module file on the Python path, importing only moectl.core and "
               "installed packages")
# the lines transformers' loader follows (a `from .name import` at the start of a line, whatever the
# indentation: see transformers.dynamic_module_utils.get_relative_imports)
LOADER_IMPORT = re.compile(r"^[ \t]*from[ \t]+\.(\w+)[ \t]+import\b", flags=re.MULTILINE)
FROM = re.compile(r"^from\s+[\w.]+\s+import")


@dataclass
class Source:
    """A module to write: its dotted name, its file, and (for a plugin module) the part it gives."""

    module: str
    path: Path
    part: str | None = None

    @property
    def flat(self) -> str:
        return flat_name(self.module)


def flat_name(module: str) -> str:
    return module.replace(".", "_")


def engine_sources() -> list[Source]:
    """Every module of moectl/core/, by dotted name."""
    root = Path(moectl.core.__file__).parent
    sources = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources.append(Source(".".join((ENGINE, *parts)), path))
    return sources


def is_engine(module: str) -> bool:
    return module == ENGINE or module.startswith(ENGINE + ".")


def plugin_sources(args: ModelArgs) -> tuple[list[Source], list[str]]:
    """The plugin modules the model's router, block kind and variant come from (their classes and
    options), and the wrapper's import line of each part (importing its class registers it)."""
    sources: dict[str, Source] = {}
    lines = []
    for key, reg in PARTS.items():
        options = getattr(args.moe, key) if args.moe is not None else None
        if options is None:
            continue
        entry = getattr(registry, reg).of(options)
        part = f"the {WHAT[key]} {entry.name!r}"
        for obj in (entry.cls, entry.options):
            if is_engine(obj.__module__):
                continue
            source = _plugin_source(obj, part)
            sources.setdefault(source.module, source)
        if not is_engine(entry.cls.__module__):
            lines.append(f"from .{flat_name(entry.cls.__module__)} import {entry.cls.__qualname__}  "
                         f"# noqa: F401  (registers {part})\n")
    return list(sources.values()), lines


def _plugin_source(obj: type, part: str) -> Source:
    module = obj.__module__
    where = f"{part} ({obj.__name__} in {module})"
    if "<locals>" in obj.__qualname__ or "." in obj.__qualname__:
        raise MoectlError(f"{where} cannot be exported: it is not defined at the top level of its module",
                          hint=PLUGIN_HINT)
    file = getattr(sys.modules.get(module), "__file__", None)
    if module == "__main__" or not file or not file.endswith(".py") or not Path(file).is_file():
        raise MoectlError(f"{where} cannot be exported: the source of {module} cannot be found", hint=PLUGIN_HINT)
    return Source(module, Path(file), where)


# --------------------------------------------------------------------------- import rewriting


def rewrite_imports(text: str, source: Source, flat: dict[str, str]) -> str:
    """`text` with its imports of the modules in `flat` (dotted name -> flat name) made relative;
    any other moectl import (and, in a plugin, a relative import or one of its own package) is refused."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            edit = _from_import(node, source, flat)
        elif isinstance(node, ast.Import):
            edit = _import(node, source, flat, used)
        else:
            continue
        if edit is not None:
            edits.append((node, edit))
    for node, edit in sorted(edits, key=lambda e: e[0].lineno, reverse=True):
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
        indent, rest = first[:node.col_offset], last[node.end_col_offset:]
        if indent.strip() or (rest.strip() and not rest.strip().startswith("#")):
            _refuse(source, f"shares a line with another statement: {ast.unparse(node)}")
        lead, modules = edit
        if not modules:   # attributes of one module: only its name changes, the layout stays
            lines[node.lineno - 1] = indent + FROM.sub(lead, first[node.col_offset:], count=1)
            continue
        # One line (the loader reads `from .name import` at the start of a line) and blank lines, so
        # that every other line keeps its number.
        stmts = ([lead] if lead else []) + [f"from . import {', '.join(modules)}"]
        span = node.end_lineno - node.lineno + 1
        lines[node.lineno - 1:node.end_lineno] = [indent + "; ".join(stmts) + rest.rstrip("\n") + "\n"] + \
            ["\n"] * (span - 1)
    return "".join(lines)


def _names(aliases: list[ast.alias]) -> str:
    return ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in aliases)


Edit = tuple[str | None, list[str]]   # a statement that comes first, and the modules `from . import` binds


def _from_import(node: ast.ImportFrom, source: Source, flat: dict[str, str]) -> Edit | None:
    """How a `from ... import` changes (None: not at all). Without modules, the statement is the
    beginning `from .name import` that replaces the original one."""
    if node.level:
        _refuse(source, f"has a relative import ({ast.unparse(node)}), which the folder would not resolve")
    module = node.module or ""
    if not _ours(module, source):
        return None
    attrs, modules = [], []
    for alias in node.names:
        full = f"{module}.{alias.name}"
        if full in flat:   # a module: bound as a module object
            modules.append(f"{flat[full]} as {alias.asname or alias.name}")
        elif module in flat:
            attrs.append(alias)
        else:
            _refuse(source, f"imports {full if alias.name != '*' else module}, which the folder would not hold")
    if not attrs:
        return None, modules
    return (f"from .{flat[module]} import {_names(attrs)}" if modules else f"from .{flat[module]} import"), modules


def _import(node: ast.Import, source: Source, flat: dict[str, str], used: set[str]) -> Edit | None:
    """`import a.b as c` binds the module; `import a.b` binds `a`, kept only for its side effect (a
    module that then uses the name `a` is refused: the flat folder has no package `a`)."""
    if not any(_ours(a.name, source) for a in node.names):
        return None
    kept, modules = [], []
    for alias in node.names:
        top = alias.name.split(".")[0]
        if not _ours(alias.name, source):
            kept.append(alias)
        elif alias.name not in flat:
            _refuse(source, f"imports {alias.name}, which the folder would not hold")
        elif alias.asname is None and "." in alias.name and top in used:
            _refuse(source, f"uses the name {top} after `import {alias.name}` (import what it uses by name)")
        else:
            modules.append(flat[alias.name] + (f" as {alias.asname}" if alias.asname else ""))
    return (f"import {_names(kept)}" if kept else None), modules


def _ours(module: str, source: Source) -> bool:
    """Whether an absolute import is one the flat folder must answer: moectl's, or (in a plugin) its
    own package's."""
    top = module.split(".")[0]
    return top == "moectl" or (source.part is not None and top == source.module.split(".")[0])


def _refuse(source: Source, why: str) -> None:
    who = source.part or f"moectl's engine module {source.module}"
    raise MoectlError(f"{who} cannot be exported: {source.module} {why}", hint=PLUGIN_HINT)


# --------------------------------------------------------------------------- the folder


def flat_modules(args: ModelArgs) -> dict[str, str]:
    """The generated code of a model: file name -> text, the wrapper `modeling_moectl.py` included."""
    plugins, part_imports = plugin_sources(args)
    sources = engine_sources() + plugins
    flat = {s.module: s.flat for s in sources}
    clash = {n for n in flat.values() if list(flat.values()).count(n) > 1 or n == WRAPPER}
    if clash:
        names = sorted(m for m, n in flat.items() if n in clash)
        raise MoectlError(f"modules {', '.join(names)} would be written under the same file name", hint=PLUGIN_HINT)
    files = {}
    for s in sources:
        try:
            text = s.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MoectlError(f"{s.part or s.module} cannot be exported: {s.path} cannot be read ({e})",
                              hint=PLUGIN_HINT) from None
        files[f"{s.flat}.py"] = rewrite_imports(text, s, flat)
    files[f"{WRAPPER}.py"] = wrapper_text(TEMPLATE.read_text(), part_imports, files)
    return files


def loader_reach(files: dict[str, str], start: str) -> set[str]:
    """The module files transformers' loader copies for module `start`: those that `from .name
    import` lines name, recursively (`start` included)."""
    reach, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in reach or f"{name}.py" not in files:
            continue
        reach.add(name)
        todo += LOADER_IMPORT.findall(files[f"{name}.py"])
    return reach


def wrapper_text(template: str, part_imports: list[str], files: dict[str, str]) -> str:
    """The wrapper: the template, with the plugin parts' imports and an import of every module
    the loader would not reach otherwise (a module imported only as `from . import name`)."""
    if template.count(GENERATED) != 1:
        raise RuntimeError(f"{TEMPLATE} must hold the line {GENERATED.strip()!r} once")
    lines = list(part_imports)
    while True:
        text = template.replace(GENERATED, GENERATED + "".join(lines))
        missing = sorted({f[:-3] for f in files} - loader_reach({**files, f"{WRAPPER}.py": text}, WRAPPER))
        if not missing:
            return text
        lines.append(f"from .{missing[0]} import __name__ as _{missing[0]}  # noqa: F401  (the loader copies it)\n")
