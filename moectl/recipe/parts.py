"""Recipe sections for the engine's registered parts, and the plugins that register more.

The engine declares each router, block kind and routed-layer variant with an options dataclass
(`moectl.core.registry`). This module turns each dataclass into a strict schema section (same
base, same strictness and error messages as every other section) and installs them in
`MoEConfig`:

    model.moe.router        one section per router kind, selected by `kind` (default topk)
    model.moe.block         one section per block kind, selected by `kind`; a bare name works too
    model.moe.<variant>     one optional section per routed-layer variant (e.g. competition)

A recipe's `plugins:` list names modules to import first; modules advertised under the
`moectl.plugins` entry-point group are imported too. Whatever they register appears in the schema
(`moectl recipes schema`), validates, builds, trains and resumes like the built-in parts.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, create_model
from pydantic.fields import FieldInfo

from moectl.errors import Issue, MoectlError, RecipeError

ENTRY_POINT_GROUP = "moectl.plugins"
_installed_version = -1
_entry_points_loaded = False
_variant_fields: set[str] = set()
_sections: dict[tuple[str, str], type] = {}   # (registry, kind) -> section class


def _registries():
    import moectl.core  # noqa: F401  (importing the engine registers its built-in parts)
    from moectl.core import registry

    return registry


def _docstring(entry) -> str:
    """The section's description: the options' docstring, else the class's."""
    for obj in (entry.options, entry.cls):
        doc = (obj.__doc__ or "").strip()
        if doc and not doc.startswith(f"{obj.__name__}("):   # not the dataclass's generated one
            return " ".join(doc.split())
    return ""


def section_for(registry_name: str, entry, with_kind: bool = True) -> type:
    """The strict schema section of one registered part, from its options dataclass."""
    from moectl.recipe.schema import Section

    key = (registry_name, entry.name)
    cached = _sections.get(key)
    if cached is not None and cached.__moectl_options__ is entry.options:
        return cached
    hints = typing.get_type_hints(entry.options, include_extras=True)
    reserved = [f.name for f in dataclasses.fields(entry.options) if f.name.startswith("model_") or hasattr(Section, f.name)]
    if reserved:
        raise ValueError(f"option name {reserved[0]!r} is reserved (pydantic uses it); rename the option")
    fields: dict[str, Any] = {}
    if with_kind:
        fields["kind"] = (Literal[entry.name], Field(entry.name, description="Which kind this section configures."))
    for f in dataclasses.fields(entry.options):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        if f.default is not dataclasses.MISSING:
            spec = Field(f.default, description=help_text, **meta)
        elif f.default_factory is not dataclasses.MISSING:
            spec = Field(default_factory=f.default_factory, description=help_text, **meta)
        else:
            spec = Field(..., description=help_text, **meta)
        fields[f.name] = (hints[f.name], spec)
    title = "".join(w.capitalize() for w in f"{entry.name}_{registry_name}".split("_"))
    section = create_model(title, __base__=Section, __doc__=_docstring(entry), **fields)
    section.__moectl_options__ = entry.options
    _sections[key] = section
    return section


def _kind_union(sections: list[type], default_kind: str, bare_name: bool) -> Any:
    """A `kind`-selected union of sections; a mapping without `kind` gets the default kind, and
    (with `bare_name`) a plain string is the name of a kind with default options."""

    def fill(v: Any) -> Any:
        if bare_name and isinstance(v, str):
            return {"kind": v}
        if isinstance(v, dict) and "kind" not in v:
            return {"kind": default_kind, **v}
        return v

    if len(sections) == 1:
        return Annotated[sections[0], BeforeValidator(fill)]
    return Annotated[Union[tuple(sections)], Field(discriminator="kind"), BeforeValidator(fill)]


def install(force: bool = False) -> None:
    """Put the sections of every registered part into MoEConfig (again, after plugins registered
    more) and rebuild the models that contain it."""
    global _installed_version
    from moectl.recipe.schema import ModelConfig, MoEConfig, Recipe

    registry = _registries()
    _load_entry_points()
    if registry.version() == _installed_version and not force:
        return
    fields = MoEConfig.__pydantic_fields__
    routers = _sections_of(registry.routers, "router", default="topk")
    blocks = _sections_of(registry.blocks, "block", default="standard")
    fields["router"] = FieldInfo.from_annotated_attribute(
        _kind_union(routers, "topk", bare_name=False),
        Field(default_factory=lambda: _section("router", "topk")(), description="The router; `kind` selects it."))
    fields["block"] = FieldInfo.from_annotated_attribute(
        _kind_union(blocks, "standard", bare_name=True),
        Field(default_factory=lambda: _section("block", "standard")(),
              description="What a MoE layer is made of; `kind` selects it (a bare kind name works too): "
              + "; ".join(f"'{e.name}': {_docstring(e)}" for e in registry.blocks)))
    for name in _variant_fields - set(registry.variants.names()):
        fields.pop(name, None)
    for e in registry.variants:
        if e.name in fields and e.name not in _variant_fields:
            raise MoectlError(f"routed-layer variant {e.name!r} ({e.module}) clashes with the model.moe key of "
                              "the same name", hint="register it under another name")
        fields[e.name] = FieldInfo.from_annotated_attribute(
            _sections_of(registry.variants, "variant", only=e)[0] | None, Field(None, description=e.summary))
        _variant_fields.add(e.name)
    for model in (MoEConfig, ModelConfig, Recipe):
        model.model_rebuild(force=True)
    _installed_version = registry.version()


def _sections_of(reg, registry_name: str, default: str | None = None, only=None) -> list[type]:
    """The sections of a registry's parts, the default kind first (an error names a part whose
    options cannot be a section, and that part is forgotten so the rest keep working)."""
    entries = [only] if only is not None else sorted(reg, key=lambda e: e.name != default)
    sections = []
    for e in entries:
        try:
            sections.append(section_for(registry_name, e, with_kind=registry_name != "variant"))
        except Exception as err:   # a plugin's options that pydantic cannot validate
            reg.remove(e.name)
            raise MoectlError(f"{reg.what} {e.name!r} ({e.module}): its options ({e.options.__qualname__}) cannot "
                              f"be a recipe section: {type(err).__name__}: {str(err).splitlines()[0]}",
                              hint="give every option a plain type (bool, int, float, str, Literal[...], lists of "
                              "them, or None) and a default") from None
    return sections


def _section(registry_name: str, kind: str) -> type:
    registry = _registries()
    return section_for(registry_name, getattr(registry, {"router": "routers", "block": "blocks"}[registry_name]).get(kind))


def variant_fields() -> list[str]:
    """The model.moe keys of the registered routed-layer variants."""
    install()
    return sorted(_variant_fields)


# --------------------------------------------------------------------------- plugins


def load_plugins(value: Any, where: str | None = None, source: str = "recipe") -> None:
    """Import a recipe's `plugins` (a list of module names); every problem names the plugin."""
    if value is None:
        return
    if not (isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)):
        raise RecipeError(source, [Issue("plugins", f"must be a list of module names, got {value!r}", where)])
    for i, name in enumerate(value):
        _import_plugin(name.strip(), f"plugins[{i}]", where, source)
    install()


def _import_plugin(name: str, label: str, where: str | None, source: str) -> None:
    from moectl.core.registry import RegistryError

    hint = ("the module must be importable: install its package, or add its folder to PYTHONPATH")
    try:
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


def _load_entry_points() -> None:
    """Import every module advertised under the `moectl.plugins` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?")
        try:
            ep.load()
        except Exception as e:
            raise MoectlError(f"the moectl plugin {ep.name!r} (entry point {ep.value!r} of the package {dist!r}) "
                              f"failed to import: {type(e).__name__}: {e}",
                              hint=f"fix or uninstall the package {dist!r}") from None
