"""Plugins: the modules that register routers, block kinds and routed-layer variants of a user's own.

A recipe's `plugins:` list names modules to import before it is validated; modules advertised under
the `moectl.plugins` entry-point group are imported on every recipe load, with no recipe key.
Whatever they register appears in the recipe schema (`moectl.recipe.schema.recipe_schema`), and
validates, builds, trains and resumes like the built-in parts. Every problem names the plugin.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from moectl.core.registry import RegistryError
from moectl.errors import Issue, MoectlError, RecipeError

ENTRY_POINT_GROUP = "moectl.plugins"
_entry_points_loaded = False


# --------------------------------------------------------------------------- plugins


def load_plugins(value: Any, where: str | None = None, source: str = "recipe", read_from: Path | None = None) -> None:
    """Import a recipe's `plugins` (a list of module names); every problem names the plugin.

    `read_from`: the run or model folder whose config.yaml names them. A folder moectl reads is
    data: its plugins are imported only from installed packages and PYTHONPATH, never from that
    folder nor from the current folder that `python -m moectl` puts first on sys.path, so a
    downloaded run cannot bring code of its own."""
    if value is None:
        return
    if not (isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)):
        raise RecipeError(source, [Issue("plugins", f"must be a list of module names, got {value!r}", where)])
    for i, name in enumerate(value):
        _import_plugin(name.strip(), f"plugins[{i}]", where, source, read_from)


@contextlib.contextmanager
def _without(folder: Path | None) -> Iterator[None]:
    """sys.path without the current folder's implicit entry and without entries inside `folder`."""
    if folder is None:
        yield
        return
    saved = list(sys.path)
    inside = Path(folder).resolve()
    cwd = Path.cwd().resolve()

    def untrusted(entry: str) -> bool:
        resolved = Path(entry or ".").resolve()
        return resolved == cwd or resolved.is_relative_to(inside)

    sys.path[:] = [e for e in sys.path if not untrusted(e)]
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_plugin(name: str, label: str, where: str | None, source: str, read_from: Path | None = None) -> None:
    hint = ("the module must be importable: install its package, or add its folder to PYTHONPATH")
    if read_from is not None:
        hint += (f" (for a run or model folder moectl reads, such as {read_from}, plugins never come from that "
                 "folder or the current folder)")
    if read_from is not None and name in sys.modules and not _trusted_origin(sys.modules[name], read_from):
        del sys.modules[name]
    try:
        with _without(read_from):
            importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise RecipeError(source, [Issue(label, f"cannot import plugin {name!r}: no module named {e.name!r}",
                                             where)], hint=hint) from None
        raise RecipeError(source, [Issue(label, f"plugin {name!r} failed to import: {e}", where)],
                          hint=f"the plugin imports {e.name!r}, which is not installed") from None
    except RegistryError as e:
        raise RecipeError(source, [Issue(label, f"plugin {name!r} cannot register its part: {e}", where)]) from None
    except Exception as e:  # a plugin's own code failed: say which, without a traceback
        raise RecipeError(source, [Issue(label, f"plugin {name!r} failed to import: {type(e).__name__}: {e}",
                                         where)], hint="fix the plugin module, or remove it from `plugins`") from None


def _trusted_origin(module: Any, folder: Path) -> bool:
    """A module already imported may stay only if it does not come from the folder being read."""
    origin = getattr(module, "__file__", None)
    return origin is None or not Path(origin).resolve().is_relative_to(Path(folder).resolve())


def load_entry_points() -> None:
    """Import every module advertised under the `moectl.plugins` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?")
        try:
            ep.load()
        except Exception as e:
            raise MoectlError(f"the moectl plugin {ep.name!r} (entry point {ep.value!r} of the package {dist!r}) "
                              f"failed to import: {type(e).__name__}: {e}",
                              hint=f"fix or uninstall the package {dist!r}") from None
