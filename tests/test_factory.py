"""The recipe schema and the engine's arguments stay in step."""

from __future__ import annotations

import dataclasses

from pydantic_core import PydanticUndefined

from moectl.core import ModelArgs, MoEArgs
from moectl.factory import model_args
from moectl.recipe.load import load_recipe
from moectl.recipe.schema import ModelConfig, MoEConfig

# Schema fields that reach the engine under another form.
MAPPED = {"layers": "layers", "first_dense": "layers", "router": "router_kind"}


def _defaults(dc):
    return {f.name: f.default for f in dataclasses.fields(dc) if f.default is not dataclasses.MISSING}


def test_every_schema_field_reaches_the_engine():
    for schema, args in ((ModelConfig, ModelArgs), (MoEConfig, MoEArgs)):
        engine = {f.name for f in dataclasses.fields(args)}
        for name in schema.model_fields:
            assert MAPPED.get(name, name) in engine, f"{schema.__name__}.{name} is not passed to {args.__name__}"


def test_defaults_agree():
    for schema, args in ((ModelConfig, ModelArgs), (MoEConfig, MoEArgs)):
        for name, default in _defaults(args).items():
            field = schema.model_fields.get(name)
            if field is not None and field.default is not PydanticUndefined:
                assert field.default == default, f"{name}: schema {field.default!r} vs engine {default!r}"


def test_model_args_from_recipe(tiny_recipe):
    args = model_args(load_recipe(tiny_recipe, ["model.moe.layers=every_other", "model.moe.router.kind=topp"]).model)
    assert args.moe.layers == [0]
    assert args.moe.router_kind == "topp" and args.moe.router_options == {"p": 0.4, "max_k": None}
    args = model_args(load_recipe(tiny_recipe, ["model.moe.first_dense=1"]).model)
    assert args.moe.layers == [1]
