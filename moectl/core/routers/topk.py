"""Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek, OLMoE), with optional
aux-loss-free bias balancing (DeepSeek-V3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from moectl.core.registry import option
from moectl.core.routers.base import (
    RouteContext,
    Router,
    RouterOutput,
    register_router,
    routing_losses,
)


def select_topk(scores_TE: Tensor, top_k: int, renormalize: bool, bias_E: Tensor | None = None,
                exclude_TE: Tensor | None = None):
    """Top-k experts per token by (scores + bias), never one `exclude_TE` marks; weights come
    from the unbiased scores."""
    choose = scores_TE if bias_E is None else scores_TE + bias_E
    if exclude_TE is not None:
        choose = choose.masked_fill(exclude_TE, float("-inf"))
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


@dataclass
class TopKOptions:
    """Token-choice top-k: each token picks its k highest-scoring experts."""

    score_func: Literal["softmax", "sigmoid"] = option(
        "softmax", "How logits become scores: softmax over experts, or per-expert sigmoid.")
    renormalize: bool = option(
        True, "Divide the k selected scores by their sum (Mixtral); false keeps raw scores (Switch).")
    jitter_eps: float = option(
        0.0, "In training, multiply the router input by U(1-eps, 1+eps). 0 disables.", ge=0, lt=1)
    bias_update_rate: float = option(
        0.0, "Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this rate after "
        "each optimizer step towards balanced load. 0 disables.", ge=0)


@register_router("topk", options=TopKOptions)
class TopKRouter(Router):
    """Scores softmax(W x) or sigmoid(W x); each token takes its k best experts."""

    fixed_k = True
    drop_top1_refusal = None

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        self.add_gate()
        # Selection-only bias of aux-loss-free balancing: a buffer, saved in checkpoints.
        biased = self.options.bias_update_rate > 0
        self.register_buffer("expert_bias", torch.zeros(self.num_experts) if biased else None)

    def logits(self, x_TD: Tensor) -> Tensor:
        x = x_TD.float()
        eps = self.options.jitter_eps
        if self.training and eps > 0:
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        return self.gate_logits(x)

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        logits = self.logits(x_TD)
        scores, probs = scores_from_logits(logits, self.options.score_func)
        ids, weights = select_topk(scores, self.top_k, self.options.renormalize, self.expert_bias,
                                   self.top1_excluded(probs, ctx))
        return RouterOutput(ids, weights, probs, logits, aux_losses=routing_losses(probs, ids, logits, ctx),
                            state=state)

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        if self.expert_bias is not None:
            load = load_E.to(self.expert_bias)
            self.expert_bias += self.options.bias_update_rate * torch.sign(load.mean() - load)
