"""docs/recipe-reference.md is generated from the schema and must match it."""

from __future__ import annotations

from moectl.recipe.load import model_types
from moectl.recipe.reference import markdown_reference
from moectl.recipe.schema import ModelConfig, MoEConfig
from tests.conftest import REPO


def test_reference_is_current():
    doc = (REPO / "docs" / "recipe-reference.md").read_text()
    assert doc == markdown_reference(), (
        "docs/recipe-reference.md is stale: run "
        "`moectl recipes schema --format markdown -o docs/recipe-reference.md`")


def test_every_field_is_documented():
    text = markdown_reference()
    parts = [cls for name in ("router", "block") for cls in model_types(MoEConfig.model_fields[name].annotation)]
    for cls in (ModelConfig, MoEConfig, *parts):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            assert f"`{name}`" in text
