"""Auxiliary router losses (unweighted; weights are applied by the MoE block)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def expert_fractions(expert_ids_TK: Tensor, num_experts: int, valid_TK: Tensor | None = None,
                     reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """f_E: the fraction of routed slots that went to each expert (sums to 1). `reduce` sums the
    counts over data-parallel ranks when given."""
    ids = expert_ids_TK.reshape(-1)
    ones = torch.ones_like(ids, dtype=torch.float32)
    if valid_TK is not None:
        ones = ones * valid_TK.reshape(-1).float()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=ids.device).index_add_(0, ids, ones)
    if reduce is not None:
        counts = reduce(counts)
    return counts / counts.sum().clamp_min(1.0)


def load_balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor, valid_TK: Tensor | None = None,
                      reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e: 1 under perfect balance, E under collapse.

    f_e (slot fractions) carries no gradient; P_e (mean probability) does."""
    num_experts = probs_TE.shape[-1]
    f_E = expert_fractions(expert_ids_TK, num_experts, valid_TK, reduce).detach()
    P_E = probs_TE.float().mean(0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
