"""Small model arguments for engine tests, with parts named the way recipes name them."""

from __future__ import annotations

from moectl.core import ModelArgs, MoEArgs, registry
from moectl.core.compete import CompetitionOptions


def options(registry_, kind: str, **values):
    """The options instance of a registered part from its kind name and option values."""
    return registry_.get(kind).options(**values)


def tiny_args(router_kind: str = "topk", router_options: dict | None = None, block: str = "standard",
              competition: CompetitionOptions | None = None, d_model: int = 32, vocab_size: int = 64,
              **moe_overrides) -> ModelArgs:
    moe = dict(num_experts=4, top_k=2, expert_hidden=32, layers=[0, 1])
    moe.update(moe_overrides)
    return ModelArgs(vocab_size=vocab_size, d_model=d_model, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=16,
                     moe=MoEArgs(**moe, router=options(registry.routers, router_kind, **(router_options or {})),
                                 block=options(registry.blocks, block), variant=competition))


def router_args(kind: str, *, d_model: int, num_experts: int, top_k: int, vocab_size: int = 64,
                **router_options) -> ModelArgs:
    """Arguments for building one router of `kind` directly (`make_router(args, index)`)."""
    return tiny_args(kind, router_options, d_model=d_model, vocab_size=vocab_size, num_experts=num_experts,
                     top_k=top_k)
