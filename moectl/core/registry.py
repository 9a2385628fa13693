"""Registries of the engine's pluggable parts, each kind with the dataclass of its options.

    routers       `model.moe.router.kind`    how tokens pick experts          (core/routers/)
    blocks        `model.moe.block.kind`     what a MoE layer is made of       (core/model.py)
    variants      `model.moe.<name>`         a routed layer that replaces the plain one
                                             (CompeteSMoE's competing layer, core/compete.py)
    trackers      `train.track.<name>`       where a run's metrics go besides metrics.jsonl
                                             (moectl/tracking.py; not part of the engine)

A part registers itself where it is defined, with its options:

    @dataclass
    class NoisyOptions:
        noise: float = option(1.0, "Std of the noise added to the logits in training.", ge=0)

    @register_router("noisy", options=NoisyOptions)
    class NoisyRouter(Router): ...

The options dataclass is the one place an option is declared: its type, default, bounds and help
text. The engine receives an instance of it; the recipe layer turns it into a strict schema
section (unknown keys, wrong types and bounds are errors with key paths), so a part added by a
user's own package is validated and documented exactly like a built-in one. This module imports
nothing heavy, so the recipe layer can read the registries cheaply.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_BOUNDS = ("ge", "gt", "le", "lt")
_version = 0   # bumped on every registration: the recipe schema rebuilds when it changes


def version() -> int:
    return _version


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           factory: Callable[[], Any] | None = None, **bounds: Any) -> Any:
    """A documented option field: `x: float = option(0.5, "What x does.", ge=0, lt=1)`.
    `factory` gives mutable defaults (lists); `bounds` are ge / gt / le / lt."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"option(): unknown bound(s) {sorted(unknown)}; use {', '.join(_BOUNDS)}")
    metadata = {"help": help, **bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class RegistryError(ValueError):
    """A part that cannot be registered (bad name, options that are not a dataclass, ...)."""


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    options: type        # a dataclass; its instance is what the engine receives
    summary: str         # one line for the recipe key that switches a variant on
    module: str          # where the part was defined (a plugin's module, for messages)


class Registry:
    """Name -> (class, options dataclass). `base` is the class every entry must derive from."""

    def __init__(self, what: str, base_name: str):
        self.what, self.base_name = what, base_name
        self._entries: dict[str, Entry] = {}
        self._by_options: dict[type, Entry] = {}
        self.base: type | None = None   # set once the base class exists (avoids an import cycle)

    def register(self, name: str, *, options: type, summary: str = "") -> Callable[[type], type]:
        """Class decorator: register the class under `name` with its options dataclass."""

        def deco(cls: type) -> type:
            global _version
            self._validate(name, cls, options)
            entry = Entry(name, cls, options, summary, cls.__module__)
            cls.kind = name
            self._entries[name] = entry
            self._by_options[options] = entry
            _version += 1
            return cls

        return deco

    def _validate(self, name: str, cls: type, options: type) -> None:
        where = f"{self.what} {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)})"
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(f"{self.what} name {name!r} must be lower-case letters, digits and "
                                "underscores, starting with a letter")
        if not isinstance(cls, type) or (self.base is not None and not issubclass(cls, self.base)):
            raise RegistryError(f"{where} must be a subclass of {self.base_name}")
        if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
            raise RegistryError(f"{where}: options must be a dataclass, got {options!r}")
        if name == "kind" or any(f.name == "kind" for f in dataclasses.fields(options)):
            raise RegistryError(f"{where}: 'kind' is reserved (it selects the {self.what})")
        old = self._entries.get(name)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RegistryError(f"{self.what} {name!r} is registered twice: by {old.module} and by {cls.__module__}")
        other = self._by_options.get(options)
        if other is not None and other.name != name:
            raise RegistryError(f"{where}: its options class is already used by {self.what} {other.name!r}")

    def remove(self, name: str) -> None:
        """Forget a part (one whose options cannot serve as a recipe section, say)."""
        global _version
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._by_options.pop(entry.options, None)
            _version += 1

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def of(self, options: Any) -> Entry:
        """The entry whose options class `options` is an instance of."""
        entry = self._by_options.get(type(options))
        if entry is None:
            raise KeyError(f"{options!r} is not the options of a registered {self.what}")
        return entry

    def default_options(self, name: str) -> Any:
        return self.get(name).options()


routers = Registry("router", "moectl.core.routers.Router")
blocks = Registry("block kind", "torch.nn.Module")
variants = Registry("routed-layer variant", "moectl.core.moe.RoutedFFN")
trackers = Registry("tracker", "moectl.tracking.Tracker")
