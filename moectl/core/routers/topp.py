"""Top-p routing (Huang et al., 2024): experts in descending probability until their cumulative
probability first exceeds p; at least one, at most max_k. Weights are the raw probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from moectl.core.registry import option
from moectl.core.routers.base import (
    RouteContext,
    Router,
    RouterOutput,
    register_router,
    routing_losses,
)


def topp_select(probs_TE: Tensor, p: float, max_k: int,
                exclude_TE: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Experts by descending probability until the running sum first exceeds p (at least one, at
    most max_k). Experts `exclude_TE` marks (one per token) are left out; the threshold then
    applies to the remaining experts' original probabilities."""
    if exclude_TE is not None:
        if probs_TE.shape[-1] < 2:
            raise ValueError("drop-top-1 needs at least two experts")
        max_k = min(max_k, probs_TE.shape[-1] - 1)
        probs_TE = probs_TE.masked_fill(exclude_TE, -1.0)   # sorts last, beyond max_k
    sorted_p, order = probs_TE.sort(dim=-1, descending=True)
    sorted_p, order = sorted_p[:, :max_k], order[:, :max_k]
    before = F.pad(sorted_p.cumsum(-1)[:, :-1], (1, 0))   # probability mass ranked above each expert
    valid = before <= p                              # keep until the running sum first exceeds p
    valid[:, 0] = True
    return order, sorted_p * valid, valid


@dataclass
class TopPOptions:
    """Top-p: experts in descending probability until the cumulative probability exceeds p."""

    p: float = option(0.4, "Cumulative probability threshold.", gt=0, le=1)
    max_k: int | None = option(None, "Most experts a token may use (default: num_experts).", gt=0)


@register_router("topp", options=TopPOptions)
class TopPRouter(Router):
    """A varying number of experts per token, by cumulative probability."""

    drop_top1_refusal = None

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        self.max_k = self.options.max_k or self.num_experts
        self.add_gate()

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        max_k = moe.router.max_k
        if max_k is not None and max_k > moe.num_experts:
            return [("router.max_k", f"max_k ({max_k}) cannot exceed num_experts ({moe.num_experts})")]
        return []

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        logits = self.gate_logits(x_TD)
        probs = logits.softmax(-1)
        ids, weights, valid = topp_select(probs, self.options.p, self.max_k, self.top1_excluded(probs, ctx))
        return RouterOutput(ids, weights, probs, logits, valid_TK=valid,
                            aux_losses=routing_losses(probs, ids, logits, ctx, valid), state=state)
