"""Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek, OLMoE), with optional
aux-loss-free bias balancing (DeepSeek-V3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moectl.core.registry import option
from moectl.core.routers.base import (
    RouteContext,
    Router,
    RouterOutput,
    fp32_linear,
    register_router,
    routing_losses,
)


def select_topk(scores_TE: Tensor, top_k: int, renormalize: bool, bias_E: Tensor | None = None,
                exclude_TE: Tensor | None = None, groups: int = 1, topk_groups: int = 1,
                group_score: str = "top2_sum"):
    """Top-k experts per token by (scores + bias), never one `exclude_TE` marks; weights come
    from the unbiased scores. With `groups` > 1 the experts form that many equal groups of
    consecutive ids and a token chooses only among its `topk_groups` best groups, a group scored
    by the sum of its two best (biased) scores or by its best one (`group_score`)."""
    choose = scores_TE if bias_E is None else scores_TE + bias_E
    if groups > 1:
        T, E = choose.shape
        per_group = choose.view(T, groups, E // groups)
        score_TG = per_group.topk(2, dim=-1).values.sum(-1) if group_score == "top2_sum" else per_group.amax(-1)
        kept = score_TG.topk(topk_groups, dim=-1).indices
        dropped_TG = torch.ones_like(score_TG, dtype=torch.bool).scatter_(-1, kept, False)
        choose = choose.masked_fill(dropped_TG.repeat_interleave(E // groups, dim=-1), float("-inf"))
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
class SelectionOptions:
    """How a token-choice router turns its logits into each token's k experts and their weights
    (the options `topk` and `recurrent` share)."""

    score_func: Literal["softmax", "sigmoid"] = option(
        "softmax", "How logits become scores: softmax over experts, or per-expert sigmoid.")
    renormalize: bool = option(
        True, "Divide the k selected scores by their sum (Mixtral); false keeps raw scores (Switch).")
    bias_update_rate: float = option(
        0.0, "Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this rate after "
        "each optimizer step towards balanced load. 0 disables.", ge=0)
    selection_bias: bool = option(
        False, "Keep a per-expert selection bias even when bias_update_rate is 0; it then stays as loaded "
        "(a converted DeepSeek-V3 or dots1 model's e_score_correction_bias).")
    groups: int = option(
        1, "Group-limited routing (DeepSeek-V2/V3): the experts form this many equal groups of consecutive "
        "ids, and a token takes its k experts only from its topk_groups best groups. 1: no groups.", gt=0)
    topk_groups: int = option(1, "How many groups each token chooses from (with groups > 1).", gt=0)
    group_score: Literal["top2_sum", "max"] = option(
        "top2_sum", "A group's score: the sum of its two best biased expert scores (DeepSeek-V3) or its best "
        "one (DeepSeek-V2).")
    routed_scaling: float = option(
        1.0, "Multiply the routed experts' weights by this, after renormalising (DeepSeek's "
        "routed_scaling_factor).", gt=0)


class TokenChoiceRouter(Router):
    """A router whose tokens take their k best experts by `SelectionOptions`: its subclasses give
    the logits; this class scores, limits groups, applies the selection bias (and moves it after
    each step under aux-loss-free balancing) and scales the weights."""

    fixed_k = True
    drop_top1_refusal = None

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        o = self.options
        # Selection-only bias: a buffer, saved in checkpoints.
        biased = o.bias_update_rate > 0 or o.selection_bias
        self.register_buffer("expert_bias", torch.zeros(self.num_experts) if biased else None)

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        o, E = moe.router, moe.num_experts
        if o.groups == 1:
            return [("router.topk_groups", "has no effect without groups (router.groups > 1)")] if o.topk_groups > 1 \
                else []
        if E % o.groups:
            return [("router.groups", f"{o.groups} must divide num_experts ({E})")]
        if o.topk_groups > o.groups:
            return [("router.topk_groups", f"{o.topk_groups} exceeds router.groups ({o.groups})")]
        if o.group_score == "top2_sum" and E // o.groups < 2:
            return [("router.group_score", f"top2_sum needs at least 2 experts per group, not {E // o.groups}")]
        if moe.top_k > o.topk_groups * (E // o.groups):
            return [("top_k", f"{moe.top_k} exceeds the experts of router.topk_groups ({o.topk_groups}) groups of "
                              f"{E // o.groups}")]
        return []

    def build_notes(self) -> list[str]:
        o = self.options
        notes = []
        if o.groups > 1:
            notes.append(f"group-limited routing: {o.groups} groups of {self.num_experts // o.groups} experts, each "
                         f"token chooses among its {o.topk_groups} best ({o.group_score}).")
        if o.routed_scaling != 1.0:
            notes.append(f"routed weights scaled by {o.routed_scaling:g}.")
        return notes

    def select(self, logits_TE: Tensor, ctx: RouteContext) -> tuple[Tensor, Tensor, Tensor]:
        """(expert ids [T, K], weights [T, K], probabilities [T, E]) from the logits."""
        o = self.options
        scores, probs = scores_from_logits(logits_TE, o.score_func)
        ids, weights = select_topk(scores, self.top_k, o.renormalize, self.expert_bias, self.top1_excluded(probs, ctx),
                                   groups=o.groups, topk_groups=o.topk_groups, group_score=o.group_score)
        if o.routed_scaling != 1.0:
            weights = weights * o.routed_scaling
        return ids, weights, probs

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        if self.expert_bias is not None and self.options.bias_update_rate > 0:
            load = load_E.to(self.expert_bias)
            self.expert_bias += self.options.bias_update_rate * torch.sign(load.mean() - load)


@dataclass
class TopKOptions(SelectionOptions):
    """Token-choice top-k: each token picks its k highest-scoring experts."""

    jitter_eps: float = option(
        0.0, "In training, multiply the router input by U(1-eps, 1+eps). 0 disables.", ge=0, lt=1)
    gate_bias: bool = option(False, "A learned bias on the router's logits (GPT-OSS).")


@register_router("topk", options=TopKOptions)
class TopKRouter(TokenChoiceRouter):
    """Scores softmax(W x) or sigmoid(W x); each token takes its k best experts."""

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        self.add_gate()
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if self.options.gate_bias else None

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:   # zero: the router starts unbiased
            nn.init.zeros_(self.bias)

    def flops_per_token(self) -> int:
        return super().flops_per_token() + (self.num_experts if self.bias is not None else 0)

    def logits(self, x_TD: Tensor) -> Tensor:
        x = x_TD.float()
        eps = self.options.jitter_eps
        if self.training and eps > 0:
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        return fp32_linear(x, self.weight, self.bias)

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        logits = self.logits(x_TD)
        ids, weights, probs = self.select(logits, ctx)
        return RouterOutput(ids, weights, probs, logits, aux_losses=routing_losses(probs, ids, logits, ctx),
                            state=state)
