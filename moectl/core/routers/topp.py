"""Top-p routing (Huang et al., 2024): experts in descending probability until their cumulative
probability first exceeds p; at least one, at most max_k. Weights are the raw probabilities."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.losses import load_balance_loss, z_loss
from moectl.core.routers.base import (
    RouteContext,
    Router,
    RouterOutput,
    fp32_logits,
    register_router,
)


def topp_select(probs_TE: Tensor, p: float, max_k: int) -> tuple[Tensor, Tensor, Tensor]:
    sorted_p, order = probs_TE.sort(dim=-1, descending=True)
    sorted_p, order = sorted_p[:, :max_k], order[:, :max_k]
    before = F.pad(sorted_p.cumsum(-1)[:, :-1], (1, 0))   # probability mass ranked above each expert
    valid = before <= p                              # keep until the running sum first exceeds p
    valid[:, 0] = True
    return order, sorted_p * valid, valid


@register_router("topp")
class TopPRouter(Router):
    def __init__(self, *, p: float = 0.4, max_k: int | None = None, **common: Any):
        super().__init__(**common)
        self.p = p
        self.max_k = max_k or self.num_experts
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.d_model))

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        logits = fp32_logits(x_TD, self.weight)
        probs = logits.softmax(-1)
        ids, weights, valid = topp_select(probs, self.p, self.max_k)
        losses = {"load_balance": load_balance_loss(probs, ids, valid, reduce=ctx.reduce_counts), "z_loss": z_loss(logits)}
        return RouterOutput(ids, weights, probs, logits, valid_TK=valid, aux_losses=losses, state=state)
