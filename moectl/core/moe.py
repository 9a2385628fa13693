"""The routed feed-forward layer: router + stacked expert bank + optional shared experts.

x_TD --router--> RouterOutput --capacity (optional)--> dispatch --experts--> combine (+ shared)

It is the one generic MoE layer; blocks made of several routed layers (CartesianMoE) or policies
that evaluate every expert (CompeteSMoE) are built from it and from its pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moectl.core.experts import ExpertBank, run_experts
from moectl.core.layers import FeedForward
from moectl.core.routers.base import RouteContext, RouterOutput, make_router


@dataclass
class RoutingRecord:
    """What one routed layer reports for one forward: losses for the objective, statistics for logs.

    `losses` are unweighted; `loss` is their weighted sum (what the objective adds). Statistics are
    detached and stay on the device until someone reads them."""

    name: str
    losses: dict[str, Tensor]
    loss: Tensor
    load_E: Tensor           # routed slots per expert, after dropping
    slots: Tensor            # slots the router asked for
    dropped: Tensor          # slots dropped by the capacity limit
    entropy: Tensor          # mean routing entropy over tokens (nats)
    tokens: int
    competed: bool = False   # this forward ran a competition over all experts (CompeteSMoE)
    extra_flops: int = 0     # forward FLOPs beyond routing to top_k experts (hardware, not model)


def apply_capacity(expert_ids_TK: Tensor, valid_TK: Tensor | None, num_experts: int,
                   capacity: int) -> Tensor:
    """Validity mask after capping each expert at `capacity` slots. Priority is k-major (every
    token's first choice before any second choice), then token order, as in GShard."""
    T, K = expert_ids_TK.shape
    valid = torch.ones_like(expert_ids_TK, dtype=torch.bool) if valid_TK is None else valid_TK
    ids_KT = expert_ids_TK.t().reshape(-1).masked_fill(~valid.t().reshape(-1), num_experts)
    order = torch.argsort(ids_KT, stable=True)
    sorted_ids = ids_KT[order]
    starts = torch.searchsorted(sorted_ids, torch.arange(num_experts + 1, device=ids_KT.device))
    rank = torch.arange(ids_KT.numel(), device=ids_KT.device) - starts[sorted_ids]
    keep_sorted = (rank < capacity) & (sorted_ids < num_experts)
    keep_KT = torch.empty_like(keep_sorted)
    keep_KT[order] = keep_sorted
    return keep_KT.view(K, T).t()


class RoutedFFN(nn.Module):
    """One routed feed-forward layer on flattened tokens x_TD."""

    component = "moe"

    def __init__(self, *, d_model: int, num_experts: int, top_k: int, expert_hidden: int,
                 activation: str = "swiglu", backend: str = "grouped_mm", router_kind: str = "topk",
                 router_options: dict[str, Any] | None = None, shared_experts: int = 0,
                 shared_hidden: int | None = None, shared_mix: str = "add",
                 capacity_factor: float | None = None, aux_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.001, index: int = 0, vocab_size: int | None = None,
                 name: str = ""):
        super().__init__()
        self.name = name or f"R{index}"
        self.index = index   # ordinal among the model's routed layers (set by the model)
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router = make_router(router_kind, d_model=d_model, num_experts=num_experts, top_k=top_k,
                                  index=index, vocab_size=vocab_size, **(router_options or {}))
        self.experts = ExpertBank(num_experts, d_model, expert_hidden, activation, backend)
        self.experts.active_fraction = top_k / num_experts
        self.shared = None
        if shared_experts:
            # n shared experts of width h are one always-on FFN of width n*h.
            self.shared = FeedForward(d_model, shared_experts * (shared_hidden or expert_hidden), activation)
            self.shared.component = "shared_experts"
        self.shared_gate = None
        if shared_experts and shared_mix == "gate":
            self.shared_gate = nn.Linear(d_model, 2, bias=True)
            self.shared_gate.component = "router"
        self.loss_weights = {"load_balance": aux_loss_weight, "z_loss": z_loss_weight}

    def init_weights(self, std: float, out_std: float) -> None:
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)
            nn.init.zeros_(self.shared_gate.bias)

    def flops_per_token(self) -> int:
        d = self.experts.d_model
        flops = self.router.flops_per_token() + self.top_k * self.experts.flops_per_slot()
        if self.shared is not None:
            flops += self.shared.flops_per_token()
        if self.shared_gate is not None:
            flops += 2 * d * 2
        return flops

    def route(self, x_TD: Tensor, ctx: RouteContext, state: Any) -> tuple[RouterOutput, Tensor | None]:
        """Router decision plus the capacity limit. Returns (output, validity mask after dropping)."""
        out = self.router(x_TD, ctx, state)
        valid = out.valid_TK
        if self.capacity_factor is not None:
            T, K = out.expert_ids_TK.shape
            cap = math.ceil(self.capacity_factor * T * self.top_k / self.num_experts)
            valid = apply_capacity(out.expert_ids_TK, valid, self.num_experts, cap)
        return out, valid

    def mix_shared(self, routed_TD: Tensor, x_TD: Tensor) -> Tensor:
        if self.shared is None:
            return routed_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is None:
            return routed_TD + shared_TD
        c = self.shared_gate(x_TD).float().softmax(-1).to(routed_TD.dtype)
        return c[:, :1] * routed_TD + c[:, 1:] * shared_TD

    def record(self, out: RouterOutput, valid: Tensor | None, load_E: Tensor,
               extra_losses: dict[str, Tensor] | None = None) -> RoutingRecord:
        losses = {**out.aux_losses, **(extra_losses or {})}
        weighted = [self.loss_weights[k] * v for k, v in losses.items() if self.loss_weights.get(k, 0) > 0]
        loss = torch.stack(weighted).sum() if weighted else load_E.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            T, K = out.expert_ids_TK.shape
            asked = out.valid_TK.sum() if out.valid_TK is not None else torch.tensor(T * K, device=load_E.device)
            kept = valid.sum() if valid is not None else asked
            p = out.probs_TE.detach()
            entropy = -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
        return RoutingRecord(self.name, {k: v.detach() for k, v in losses.items()}, loss,
                             load_E.detach().float(), asked.float(), (asked - kept).float(), entropy, T)

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> tuple[Tensor, Any, RoutingRecord]:
        out, valid = self.route(x_TD, ctx, state)
        weights = out.weights_TK if valid is None else out.weights_TK * valid
        y_TD, load_E = run_experts(self.experts, x_TD, out.expert_ids_TK, weights, valid)
        return self.mix_shared(y_TD, x_TD), out.state, self.record(out, valid, load_E)
