"""From a validated recipe to engine objects. The one place that knows both sides."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moectl.core import ModelArgs, MoEArgs, MoETransformer, registry
from moectl.errors import MoectlError
from moectl.recipe.schema import ModelConfig, Recipe, variant_fields


def _options(reg, kind: str, section: Any) -> Any:
    """The engine's options object of a registered part, from its recipe section."""
    return reg.get(kind).options(**section.model_dump(exclude={"kind"}))


def _same_named(section: Any, args_cls: type, skip: set[str]) -> dict[str, Any]:
    """The recipe values of every engine argument that has a schema field of the same name."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(args_cls)
            if f.name not in skip and f.name in type(section).model_fields}


def model_args(cfg: ModelConfig) -> ModelArgs:
    moe = None
    if cfg.moe is not None:
        m = cfg.moe
        variant = next((name for name in variant_fields() if getattr(m, name, None) is not None), None)
        moe = MoEArgs(
            **_same_named(m, MoEArgs, skip={"layers", "router", "block", "variant"}),
            layers=m.layer_indices(cfg.n_layers),
            router=_options(registry.routers, m.router.kind, m.router),
            block=_options(registry.blocks, m.block.kind, m.block),
            variant=_options(registry.variants, variant, getattr(m, variant)) if variant else None,
        )
    scaling = cfg.rope_scaling.model_dump() if cfg.rope_scaling is not None else None
    latent = cfg.latent_attention.model_dump() if cfg.latent_attention is not None else None
    return ModelArgs(**_same_named(cfg, ModelArgs, skip={"moe", "rope_scaling", "latent_attention"}),
                     rope_scaling=scaling, latent_attention=latent, moe=moe)


def build_model(recipe: Recipe, device: str | torch.device | None = None) -> MoETransformer:
    """Instantiate the recipe's model, initialised from the recipe's seed. device="meta" builds the
    structure without allocating memory (for counting, or to load weights into with assign=True)."""
    args = model_args(recipe.model)
    try:
        if str(device) == "meta":
            with torch.device("meta"):
                return MoETransformer(args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = MoETransformer(args)
        return model.to(device) if device is not None else model
    except (RuntimeError, TypeError, OverflowError, MemoryError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, (RuntimeError, TypeError)) and not any(w in text.lower() for w in ("overflow", "memory",
                                                                                              "alloc")):
            raise
        raise MoectlError(f"the model cannot be built: {text[:200]}",
                          hint="check the model sizes (d_model, ffn_hidden, vocab_size, num_experts, "
                               "expert_hidden); `moectl build` shows what a recipe needs") from None
