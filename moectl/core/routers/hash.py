"""Hash routing (Roller et al., 2021 style): scores from a fixed random table indexed by token id.

Nothing in the router is learned, so it has no auxiliary losses. The table is a buffer saved with
the model and derived from (seed, routed-layer index), so every layer routes differently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moectl.core.registry import option
from moectl.core.routers.base import RouteContext, Router, RouterOutput, register_router
from moectl.core.routers.topk import select_topk


@dataclass
class HashOptions:
    """Fixed routing from a random per-token-id table; nothing in it is learned."""

    seed: int = option(0, "Seed of the fixed random [vocab, experts] table (0 to 2^32 - 1).", ge=0, lt=2**32)


@register_router("hash", options=HashOptions)
class HashRouter(Router):
    """Top-k of softmax(table[token id]), renormalised."""

    balance_loss = False
    fixed_k = True
    learned = False
    drop_top1_refusal = None

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        if self.vocab_size is None:
            raise ValueError("hash routing needs vocab_size")
        self.register_buffer("table", torch.empty(self.vocab_size, self.num_experts))

    def init_weights(self, std: float, out_std: float) -> None:
        if self.table.is_meta:
            return
        g = torch.Generator().manual_seed(self.options.seed * 100_003 + self.index)
        self.table.copy_(torch.randn(self.vocab_size, self.num_experts, generator=g))

    def flops_per_token(self) -> int:
        return 0

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        if ctx.token_ids_T is None:
            raise ValueError("hash routing needs the token ids in the route context")
        probs = self.table[ctx.token_ids_T].float().softmax(-1)
        ids, weights = select_topk(probs, self.top_k, renormalize=True, exclude_TE=self.top1_excluded(probs, ctx))
        return RouterOutput(ids, weights, probs, None, state=state)
