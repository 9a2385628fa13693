"""Expert choice (Zhou et al., 2022): each expert takes its top-C tokens of the batch.

Tokens may get anywhere from 0 to E experts. In a causal language model the choice looks at the
whole batch, so a token's routing depends on later tokens: training loss is optimistic and the
routing cannot be reproduced token by token at generation time (as its paper notes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moectl.core.losses import z_loss
from moectl.core.registry import option
from moectl.core.routers.base import RouteContext, Router, RouterOutput, register_router


@dataclass
class ExpertChoiceOptions:
    """Expert choice: each expert picks its top-C tokens of the batch."""

    capacity_factor: float = option(1.0, "C = capacity_factor * T * top_k / num_experts tokens per expert.", gt=0)


@register_router("expert_choice", options=ExpertChoiceOptions)
class ExpertChoiceRouter(Router):
    """Each expert takes its C most probable tokens; balanced by construction."""

    balance_loss = False
    drop_top1_refusal = ("experts choose tokens, so a token has no fixed set of K experts to take its top-1 "
                         "from and refill; the perturbation of the CartesianMoE paper is defined for token choice")
    causal = False

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        self.add_gate()

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        if moe.capacity_factor is not None:
            return [("capacity_factor", "expert_choice sets its own capacity (model.moe.router.capacity_factor); "
                                        "leave model.moe.capacity_factor null")]
        return []

    def build_notes(self) -> list[str]:
        return [*super().build_notes(),
                "expert_choice is not causal: a token's routing depends on later tokens of the batch, so its "
                "training and validation losses are optimistic for a language model."]

    def capacity(self, num_tokens: int) -> int:
        c = math.ceil(self.options.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, c))

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        logits = self.gate_logits(x_TD)
        probs = logits.softmax(-1)
        T, E = probs.shape
        chosen_CE = probs.topk(self.capacity(T), dim=0).indices           # tokens each expert takes
        picked_TE = torch.zeros_like(probs, dtype=torch.bool)
        picked_TE.scatter_(0, chosen_CE, True)
        k_max = max(1, int(picked_TE.sum(1).max()))                      # data-dependent width
        # Per token, the experts that picked it first (ties broken by expert index).
        rank_TE = picked_TE.float() * 2 - torch.arange(E, device=probs.device) / E
        expert_ids = rank_TE.topk(k_max, dim=-1).indices
        valid = picked_TE.gather(-1, expert_ids)
        weights = probs.gather(-1, expert_ids) * valid
        losses = {"z_loss": z_loss(logits)}
        return RouterOutput(expert_ids, weights, probs, logits, valid_TK=valid, aux_losses=losses, state=state)
