"""The Hugging Face model families moectl converts natively, each in both directions: one module per
family in this package, each defining one `Family` subclass (`base` holds what they share).

The registry finds the family modules by itself: adding a family is one new module here (and its
tests), with no edit anywhere else (docs/convert.md, "Adding a family").
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING, Any

from moectl.convert.families.base import (
    CONVERT_HINT,
    Family,
    Layout,
    Renamed,
    from_hf_plan,
    from_hf_state,
    to_hf_plan,
    to_hf_state,
)
from moectl.errors import MoectlError

if TYPE_CHECKING:
    from moectl.recipe.schema import ModelConfig

__all__ = ["CONVERT_HINT", "Family", "Layout", "Renamed", "discover", "families", "family_of", "from_hf_plan",
           "from_hf_state", "native_family", "to_hf_plan", "to_hf_state"]
SHARED_MODULES = {"base"}   # modules of the package that are not a family


def discover(path: list[str], package: str) -> list[Family]:
    """One instance of the `Family` subclass defined in each module of the package at `path` (other
    than `base` and private modules), in the order `native_family` tries them."""
    found: list[Family] = []
    for info in pkgutil.iter_modules(path):
        if info.name in SHARED_MODULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        classes = [c for c in vars(module).values()
                   if isinstance(c, type) and issubclass(c, Family) and c.__module__ == module.__name__]
        if len(classes) != 1:
            raise TypeError(f"family module {module.__name__} must define exactly one Family subclass, "
                            f"found {len(classes)}")
        found.append(classes[0]())
    found.sort(key=lambda f: (f.order, f.model_type))
    seen: dict[str, Family] = {}
    for family in found:
        if family.model_type in seen:
            raise TypeError(f"{type(family).__module__} and {type(seen[family.model_type]).__module__} both "
                            f"convert model_type {family.model_type!r}")
        seen[family.model_type] = family
    return found


@cache
def families() -> dict[str, Family]:
    """Every family of this package by model_type, in the order `native_family` tries them."""
    return {f.model_type: f for f in discover(__path__, __name__)}


def native_family(m: ModelConfig, prefer: str | None = None) -> tuple[Family | None, dict[str, list[str]]]:
    """The first family that fits the model exactly (`prefer`, a family's name, first: the one a
    model was imported from, so that it goes back to its own class), and why each other one does not."""
    reasons = {}
    ordered = sorted(families().values(), key=lambda f: f.name != prefer)
    for family in ordered:
        why = family.misfits(m)
        if not why:
            return family, reasons
        reasons[family.name] = why
    return None, reasons


def family_of(cfg: dict[str, Any], where: str) -> Family:
    """The family of a config.json (its model_type), or a clear error."""
    known = families()
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise MoectlError(f"{where}: config.json's model_type is {str(model_type)[:60]!r}, not a name",
                          hint="the config.json is damaged; download the model again")
    if model_type in known:
        return known[model_type]
    arch = (cfg.get("architectures") or ["?"])[0] if isinstance(cfg.get("architectures"), list) else "?"
    names = ", ".join(f"{f.name} ({f.model_type})" for f in known.values())
    raise MoectlError(f"{where}: model_type {model_type!r} ({arch}) is not a family moectl converts",
                      hint=f"moectl imports {names}, and folders it exported itself; {CONVERT_HINT}")
