"""Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek, OLMoE), with optional
aux-loss-free bias balancing (DeepSeek-V3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moectl.core.losses import load_balance_loss, z_loss
from moectl.core.routers.base import (
    RouteContext,
    Router,
    RouterOutput,
    fp32_logits,
    register_router,
)


def select_topk(scores_TE: Tensor, top_k: int, renormalize: bool, bias_E: Tensor | None = None):
    """Top-k experts per token by (scores + bias); weights come from the unbiased scores."""
    choose = scores_TE if bias_E is None else scores_TE + bias_E
    expert_ids_TK = choose.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, expert_ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return expert_ids_TK, weights_TK


def scores_from_logits(logits_TE: Tensor, score_func: str) -> tuple[Tensor, Tensor]:
    """(scores used for selection and weights, probabilities that sum to 1 per token)."""
    if score_func == "softmax":
        probs = logits_TE.softmax(-1)
        return probs, probs
    scores = logits_TE.sigmoid()
    return scores, scores / scores.sum(-1, keepdim=True)


@register_router("topk")
class TopKRouter(Router):
    fixed_k = True

    def __init__(self, *, score_func: str = "softmax", renormalize: bool = True,
                 jitter_eps: float = 0.0, bias_update_rate: float = 0.0, **common: Any):
        super().__init__(**common)
        self.score_func, self.renormalize = score_func, renormalize
        self.jitter_eps, self.bias_update_rate = jitter_eps, bias_update_rate
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.d_model))
        # Selection-only bias of aux-loss-free balancing; a buffer, saved in checkpoints.
        self.register_buffer("expert_bias", torch.zeros(self.num_experts), persistent=bias_update_rate > 0)

    def logits(self, x_TD: Tensor) -> Tensor:
        x = x_TD.float()
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        return fp32_logits(x, self.weight)

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        logits = self.logits(x_TD)
        scores, probs = scores_from_logits(logits, self.score_func)
        bias = self.expert_bias if self.bias_update_rate > 0 else None
        ids, weights = select_topk(scores, self.top_k, self.renormalize, bias)
        losses = {"load_balance": load_balance_loss(probs, ids, reduce=ctx.reduce_counts), "z_loss": z_loss(logits)}
        return RouterOutput(ids, weights, probs, logits, aux_losses=losses, state=state)

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        if self.bias_update_rate > 0:
            load = load_E.to(self.expert_bias)
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
