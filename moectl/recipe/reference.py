"""The recipe reference in Markdown, generated from the schema (docs/recipe-reference.md)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from moectl.recipe.load import model_types
from moectl.recipe.schema import recipe_schema


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return {"NoneType": "null", "str": "string", "int": "integer", "float": "number",
                "bool": "boolean"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default if field.default_factory is None else field.default_factory()
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if value is None:
        return "`null`"
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _sections(cls: type[BaseModel], path: str, out: list[tuple[str, type[BaseModel]]]) -> None:
    out.append((path, cls))
    for name, field in cls.model_fields.items():
        models = model_types(field.annotation)
        for sub in models:
            label = f"{path}.{name}" if path else name
            if len(models) > 1:
                label += f" (kind: {sub.model_fields['kind'].default})"
            if (label, sub) not in out:
                _sections(sub, label, out)


def markdown_reference() -> str:
    lines = ["# Recipe reference", "",
             "Generated from the schema by `moectl recipes schema --format markdown`; do not edit by hand.",
             "Every key is optional unless marked **required**. Unknown keys are errors.", ""]
    sections: list[tuple[str, type[BaseModel]]] = []
    _sections(recipe_schema(), "", sections)
    for path, cls in sections:
        lines += [f"## `{path or '(top level)'}`", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines)
