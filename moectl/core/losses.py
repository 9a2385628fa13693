"""Auxiliary router losses (unweighted; weights are applied by the MoE block)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


BALANCE_FORMS = ("switch", "switch_top1", "entropy")
BALANCE_POOLINGS = ("batch", "sequence")


@dataclass(frozen=True)
class BalanceSpec:
    """Which balance loss a routed layer computes (docs/methods.md gives each choice's source).

    form     switch:      E * sum_e f_e * P_e, f_e over every routed slot (Switch, GShard, Mixtral)
             switch_top1: the same with f_e over each token's first choice only (Switch with k = 1)
             entropy:     sum_e P_e * log P_e, the negative entropy of the mean routing distribution
                          (sigma-MoE / MoEUT and the CompeteSMoE 2025 language-model code);
                          -log E when balanced, 0 when every token goes to one expert
    pooling  batch:       f and P over every token of the forward (f summed over data-parallel
                          ranks when a count reducer is set)
             sequence:    f and P over each sequence's tokens, the loss averaged over sequences
    """

    form: str = "switch"
    pooling: str = "batch"

    def __post_init__(self) -> None:
        if self.form not in BALANCE_FORMS:
            raise ValueError(f"unknown balance form {self.form!r}; known: {', '.join(BALANCE_FORMS)}")
        if self.pooling not in BALANCE_POOLINGS:
            raise ValueError(f"unknown balance pooling {self.pooling!r}; known: {', '.join(BALANCE_POOLINGS)}")

    def describe(self) -> str:
        form = {"switch": "Switch over all slots", "switch_top1": "Switch over first choices",
                "entropy": "entropy form"}[self.form]
        return f"{form}, {'per sequence' if self.pooling == 'sequence' else 'over the batch'}"


SWITCH_BATCH = BalanceSpec()


def neg_entropy(p_E: Tensor) -> Tensor:
    """sum_e p_e log p_e over the last dimension (0 log 0 = 0, with a finite gradient there)."""
    return (p_E * p_E.clamp_min(torch.finfo(p_E.dtype).tiny).log()).sum(-1)


def balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor, spec: BalanceSpec = SWITCH_BATCH, *,
                 valid_TK: Tensor | None = None, seq_len: int | None = None,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The balance loss `spec` names, unweighted. `seq_len` splits the T tokens into sequences for
    `pooling: sequence` (None: one sequence of all T tokens); `reduce`
    sums expert counts over data-parallel ranks and applies to batch pooling only (per-sequence
    values do not depend on the process count)."""
    if spec.form == "switch_top1":
        expert_ids_TK = expert_ids_TK[:, :1]
        valid_TK = valid_TK[:, :1] if valid_TK is not None else None
    if spec.pooling == "batch":
        if spec.form == "entropy":
            return neg_entropy(probs_TE.float().mean(0))
        return load_balance_loss(probs_TE, expert_ids_TK, valid_TK, reduce=reduce)
    T, E = probs_TE.shape
    if seq_len is not None and T % seq_len:
        raise ValueError(f"per-sequence balance pooling: {T} tokens are not sequences of {seq_len}")
    S = seq_len or max(T, 1)
    P_BE = probs_TE.float().reshape(-1, S, E).mean(1)
    if spec.form == "entropy":
        return neg_entropy(P_BE).mean()
    B, K = P_BE.shape[0], expert_ids_TK.shape[1]
    ones = torch.ones(B, S * K, dtype=torch.float32, device=probs_TE.device)
    if valid_TK is not None:
        ones = ones * valid_TK.reshape(B, S * K).float()
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=probs_TE.device).scatter_add_(
        1, expert_ids_TK.reshape(B, S * K), ones)
    f_BE = (counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1.0)).detach()
    return (E * (f_BE * P_BE).sum(-1)).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


# --------------------------------------------------------------------------- LM head + loss

IGNORE_INDEX = -100


def head_cross_entropy_reference(h_TD: Tensor, weight_VD: Tensor, targets_T: Tensor) -> Tensor:
    """The plain LM-head loss: fp32 logits of every token, then mean cross-entropy."""
    logits = torch.nn.functional.linear(h_TD, weight_VD)
    return torch.nn.functional.cross_entropy(logits.float(), targets_T, ignore_index=IGNORE_INDEX)


def _chunk_rows(vocab: int) -> int:
    """Tokens per chunk: about 4M logits (16 MB in fp32) at a time."""
    return max(16, (1 << 22) // max(vocab, 1))


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h @ W^T, computed chunk by chunk over tokens without keeping logits.

    The forward of a chunk computes its logits, their log-sum-exp and loss, and - when a gradient
    will be needed - turns the logits in place into d loss / d logits (softmax minus the one-hot
    target, over the count of counted tokens) and multiplies that into the gradients of h and W at
    once. Only those two gradients are kept; the backward scales them by the incoming gradient.
    One pass over each chunk's logits replaces log_softmax's forward and its backward, and peak
    memory holds one chunk of logits instead of all of them."""

    @staticmethod
    def forward(ctx, h_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, compute_dtype: torch.dtype,
                grads: bool) -> Tensor:
        T = h_TD.shape[0]
        h, w = h_TD.to(compute_dtype), weight_VD.to(compute_dtype)
        counted = targets_T != IGNORE_INDEX
        n = counted.sum().clamp_min(1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        g_h = torch.empty_like(h) if grads else None
        g_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None
        step = _chunk_rows(w.shape[0])
        for s in range(0, T, step):
            hc, yc, mc = h[s:s + step], targets_T[s:s + step], counted[s:s + step]
            z = (hc @ w.t()).float()
            y0 = yc.clamp_min(0).unsqueeze(1)
            target = z.gather(1, y0).squeeze(1)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()                           # in place: exp(z - max)
            norm = z.sum(1)
            lse = top.squeeze(1) + norm.log()
            total = total + ((lse - target) * mc).sum()
            if grads:   # softmax = exp(z - max) / norm, then minus the one-hot target, over n
                z.mul_((mc.to(z.dtype) / (n * norm)).unsqueeze(1))
                z.scatter_add_(1, y0, (-mc.to(z.dtype) / n).unsqueeze(1))
                gz = z.to(compute_dtype)
                g_h[s:s + step] = gz @ w
                if compute_dtype == torch.float32:
                    g_w.addmm_(gz.t(), hc)
                else:   # the product in the compute dtype, summed over chunks in fp32
                    g_w.add_(gz.t() @ hc)
        if grads:
            ctx.save_for_backward(g_h, g_w)
        ctx.dtypes = (h_TD.dtype, weight_VD.dtype)
        return total / n

    @staticmethod
    def backward(ctx, g: Tensor):
        g_h, g_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        g = g.to(torch.float32)
        return (g_h * g.to(g_h.dtype)).to(h_dtype), (g_w * g).to(w_dtype), None, None, None


def head_cross_entropy(h_TD: Tensor, weight_VD: Tensor, targets_T: Tensor) -> Tensor:
    """Mean next-token cross-entropy of the LM head (`head_cross_entropy_reference`'s value), chunked
    and fused with its gradient (`_HeadCrossEntropy`). The matmuls run in autocast's dtype when it
    is on, the softmax in fp32. Tokens whose target is -100 are not counted."""
    device = h_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight_VD.dtype
    grads = torch.is_grad_enabled() and (h_TD.requires_grad or weight_VD.requires_grad)
    with torch.autocast(device, enabled=False):
        return _HeadCrossEntropy.apply(h_TD, weight_VD, targets_T, dtype, grads)
