"""The recipe schema and the engine's arguments stay in step: every field on either side has its
counterpart with the same default, and each registered part's recipe section is its options."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic_core import PydanticUndefined

from moectl.core import ModelArgs, MoEArgs, registry
from moectl.factory import model_args
from moectl.recipe.load import load_recipe
from moectl.recipe.schema import ModelConfig, moe_schema, section_for, variant_fields

# Schema fields that reach the engine under another form.
SCHEMA_ONLY = {"first_dense"}                         # folded into MoEArgs.layers
ENGINE_FROM_PARTS = {"router", "block", "variant"}    # options objects of registered parts


def _defaults(dc):
    return {f.name: f.default for f in dataclasses.fields(dc) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("schema, args", [(ModelConfig, ModelArgs), (moe_schema(), MoEArgs)])
def test_fields_match_both_ways(schema, args):
    engine = {f.name for f in dataclasses.fields(args)}
    variants = set(variant_fields())
    for name in schema.model_fields:
        if name in SCHEMA_ONLY or name in variants:
            continue
        assert name in engine, f"{schema.__name__}.{name} does not reach {args.__name__}"
    for name in engine - ENGINE_FROM_PARTS:
        assert name in schema.model_fields, f"{args.__name__}.{name} has no recipe key in {schema.__name__}"


@pytest.mark.parametrize("schema, args", [(ModelConfig, ModelArgs), (moe_schema(), MoEArgs)])
def test_defaults_agree(schema, args):
    for name, default in _defaults(args).items():
        field = schema.model_fields.get(name)
        if field is not None and field.default is not PydanticUndefined:
            assert field.default == default, f"{name}: schema {field.default!r} vs engine {default!r}"


@pytest.mark.parametrize("registry_name, entry", [(name, e) for name in ("routers", "blocks", "variants")
                                                  for e in getattr(registry, name)],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_part_sections_are_their_options(registry_name, entry):
    section = section_for(registry_name.rstrip("s"), entry, with_kind=registry_name != "variants")
    fields = {f.name: f for f in dataclasses.fields(entry.options)}
    assert set(section.model_fields) - {"kind"} == set(fields)
    instance = entry.options()
    for name, f in section.model_fields.items():
        if name != "kind":
            assert f.default == getattr(instance, name), name
            assert f.description, f"{entry.name}.{name} has no help text"


def test_model_args_from_recipe(tiny_recipe):
    args = model_args(load_recipe(tiny_recipe, ["model.moe.layers=every_other", "model.moe.router.kind=topp"]).model)
    assert args.moe.layers == [0]
    assert registry.routers.of(args.moe.router).name == "topp"
    assert dataclasses.asdict(args.moe.router) == {"p": 0.4, "max_k": None}
    args = model_args(load_recipe(tiny_recipe, ["model.moe.first_dense=1", "model.moe.block=cartesian",
                                                "model.moe.competition.rate=0.5"]).model)
    assert args.moe.layers == [1] and registry.blocks.of(args.moe.block).name == "cartesian"
    assert args.moe.variant.rate == 0.5 and registry.variants.of(args.moe.variant).name == "competition"
