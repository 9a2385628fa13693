"""docs/recipe-reference.md is generated from the schema and must match it."""

from __future__ import annotations

from moectl.recipe.load import model_types
from moectl.recipe.reference import markdown_reference
from moectl.recipe.schema import moe_schema, recipe_schema
from tests.conftest import REPO


def test_reference_is_current():
    doc = (REPO / "docs" / "recipe-reference.md").read_text()
    assert doc == markdown_reference(), (
        "docs/recipe-reference.md is stale: run "
        "`moectl recipes schema --format markdown -o docs/recipe-reference.md`")


def test_every_field_is_documented():
    text = markdown_reference()
    moe = moe_schema()
    model = recipe_schema().model_fields["model"].annotation
    parts = [cls for name in ("router", "block") for cls in model_types(moe.model_fields[name].annotation)]
    assert len(parts) >= 7   # every router and block kind
    for cls in (model, moe, *parts):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            assert f"`{name}`" in text
