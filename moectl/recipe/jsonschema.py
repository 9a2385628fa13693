"""JSON Schema for recipes, for editors (yaml-language-server) and external validators."""

from __future__ import annotations

from typing import Any

from moectl.recipe.schema import Recipe


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "moectl recipe"}
