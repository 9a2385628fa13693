"""JSON Schema for recipes, for editors (yaml-language-server) and external validators."""

from __future__ import annotations

from typing import Any

from moectl.core import registry
from moectl.recipe.schema import recipe_schema


def recipe_json_schema() -> dict[str, Any]:
    schema = recipe_schema().model_json_schema(mode="validation")
    # `block` also accepts a bare kind name (`block: cartesian`), which pydantic's schema cannot say.
    block = schema["$defs"]["MoEConfig"]["properties"]["block"]
    sections = {k: block.pop(k) for k in list(block) if k not in ("default", "description", "title")}
    block["anyOf"] = [{"enum": registry.blocks.names()}, sections]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "moectl recipe"}
