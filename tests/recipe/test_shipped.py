"""Every shipped recipe (found by recursive glob, never a list) validates, and the JSON Schema that
`moectl recipes schema` emits accepts each of them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from moectl.recipe.load import dump_recipe, load_raw, load_recipe
from tests.conftest import REPO

SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)
    assert len(SHIPPED) >= 7


@pytest.fixture(scope="module")
def schema():
    from typer.testing import CliRunner

    from moectl.cli.app import app

    result = CliRunner().invoke(app, ["recipes", "schema"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipe_validates(path, schema):
    recipe = load_recipe(path)
    raw, _, _ = load_raw(path)          # after `extends`, before defaults: what the user wrote
    jsonschema.validate(raw, schema)
    jsonschema.validate(json.loads(json.dumps(recipe.model_dump(mode="json"))), schema)
    # The resolved form round-trips: loading what `recipes show` prints gives the same recipe.
    again = load_recipe(_write_tmp(dump_recipe(recipe)))
    assert again == recipe.model_copy(update={"extends": None})


def test_schema_rejects_what_the_loader_rejects(schema):
    bad = {"model": {"vocab_size": 8, "d_model": 8, "n_layers": 1, "n_heads": 2, "ffn_hidden": 8,
                     "moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 8, "top_kk": 3}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad["model"]["moe"].pop("top_kk")
    bad["model"]["moe"]["router"] = {"kind": "nope"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _write_tmp(text: str):
    import tempfile
    from pathlib import Path

    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    f.write(text)
    f.close()
    return Path(f.name)
