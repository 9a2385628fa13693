"""Small model arguments for engine tests."""

from __future__ import annotations

from moectl.core import ModelArgs, MoEArgs


def tiny_args(**moe_overrides) -> ModelArgs:
    moe = dict(num_experts=4, top_k=2, expert_hidden=32, layers=[0, 1])
    moe.update(moe_overrides)
    return ModelArgs(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=16,
                     moe=MoEArgs(**moe))
