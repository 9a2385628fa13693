"""CompeteSMoE (Pham et al., 2024; Nguyen et al., 2025): competition by neural response.

On a competition step a layer evaluates every expert and routes each token to the K experts with
the strongest response, weighting them by their responses. The router, which the competition
step does not use, learns to predict the competition's outcome (router distillation); every
other step routes with the router as usual. Competition runs only on scheduled (layer, step)
pairs during training, never in evaluation.

    o_i = E_i(x) for all experts            s_i = mean(softplus(o_i))  (or ||o_i||_2)
    win = top-K of s                        w_i = s_i / sum_win s     (or softmax over winners)
    y   = sum_win w_i o_i
    L_rt  = MSE(p_R, p_C) + theta * MSE(p_R[win], p_C[win])   p_R = softmax(router logits),
                                                              p_C = softmax(s), detached
    L_div = mean over tokens of the winners' pairwise cosine similarities (diagonal zeroed, / K^2)
    L_bal = E * sum_e f_e * P_e, f from each token's first choice, P = mean softmax(s)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moectl.core.config import CompetitionArgs
from moectl.core.moe import RoutedFFN, RoutingRecord
from moectl.core.routers.base import RouteContext


def responses(o_ETD: Tensor, kind: str) -> Tensor:
    """Each expert's response to each token, [T, E] in fp32."""
    o = o_ETD.float()
    s_ET = F.softplus(o).mean(-1) if kind == "mean_softplus" else o.norm(dim=-1)
    return s_ET.t()


def competition_gates(s_TE: Tensor, top_k: int, gate: str) -> tuple[Tensor, Tensor]:
    """Winners (top-K responses) and their weights."""
    s_win, win = s_TE.topk(top_k, dim=-1)
    if gate == "linear":
        w = s_win / s_win.sum(-1, keepdim=True).clamp_min(1e-20)
    else:
        w = s_win.softmax(-1)
    return win, w


def router_distillation_loss(p_router_TE: Tensor, p_comp_TE: Tensor, win_TK: Tensor, theta: float) -> Tensor:
    p_comp = p_comp_TE.detach()
    loss = F.mse_loss(p_router_TE, p_comp)
    if theta:
        loss = loss + theta * F.mse_loss(p_router_TE.gather(-1, win_TK), p_comp.gather(-1, win_TK))
    return loss


def diversity_loss(o_win_TKD: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of each token's winning outputs (diagonal zeroed, / K^2)."""
    u = F.normalize(o_win_TKD.float(), dim=-1)
    sim = u @ u.transpose(1, 2)
    K = sim.shape[-1]
    sim = sim * (1 - torch.eye(K, device=sim.device))
    return sim.sum((-1, -2)).mean() / (K * K)


class CompeteFFN(RoutedFFN):
    """A routed FFN that competes on scheduled steps and routes with its router otherwise."""

    def __init__(self, *, competition: CompetitionArgs, **kwargs: Any):
        super().__init__(**kwargs)
        self.competition = competition
        self.loss_weights.update(router_distill=competition.router_loss_weight,
                                 diversity=competition.diversity_weight,
                                 compete_balance=competition.balance_weight)

    def extra_flops_per_token(self) -> int:
        """Forward FLOPs a competition adds over routing to top_k experts."""
        return (self.num_experts - self.top_k) * self.experts.flops_per_slot()

    def competes(self, ctx: RouteContext) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        if self.competition.schedule == "bernoulli":
            return bool(torch.rand(()) < self.competition.rate)
        return self.index in ctx.compete

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> tuple[Tensor, Any, RoutingRecord]:
        if not self.competes(ctx):
            return super().forward(x_TD, ctx, state)
        c = self.competition
        out = self.router(x_TD, ctx, state)              # used only for distillation (and its state)
        o_ETD = self.experts.forward_all(x_TD)
        s_TE = responses(o_ETD, c.response)
        win_TK, w_TK = competition_gates(s_TE, self.top_k, c.gate)
        T = x_TD.shape[0]
        o_TED = o_ETD.transpose(0, 1)
        o_win_TKD = o_TED.gather(1, win_TK.unsqueeze(-1).expand(-1, -1, o_TED.shape[-1]))
        y_TD = (o_win_TKD * w_TK.to(o_win_TKD.dtype).unsqueeze(-1)).sum(1)
        p_comp = s_TE.softmax(-1)
        f_E = torch.bincount(win_TK[:, 0], minlength=self.num_experts).float()
        if ctx.reduce_counts is not None:
            f_E = ctx.reduce_counts(f_E)
        f_E = f_E / f_E.sum().clamp_min(1)
        losses = {
            "router_distill": router_distillation_loss(out.probs_TE, p_comp, win_TK, c.theta),
            "diversity": diversity_loss(o_win_TKD),
            "compete_balance": self.num_experts * (f_E * p_comp.mean(0)).sum(),
        }
        load_E = torch.bincount(win_TK.reshape(-1), minlength=self.num_experts)
        # The router's own balance and z losses are left out: on a competition step the router
        # learns from the distillation loss alone.
        out.aux_losses = {}
        out.expert_ids_TK = win_TK
        record = self.record(out, None, load_E, losses)
        record.competed = True
        record.extra_flops = self.extra_flops_per_token() * T
        return self.mix_shared(y_TD, x_TD), out.state, record


class CompetitionSchedule:
    """Which routed layers compete at which step, drawn once from the seed.

    After a warm-up fraction with no competition, each layer competes at each step with
    probability `rate`; at most `max_layers` compete in one step, and a draw that would exceed the
    cap moves to the nearest earlier step with room (that layer not already competing there),
    else the nearest later one. The same seed gives the same schedule on every process."""

    def __init__(self, seed: int, total_steps: int, num_layers: int, rate: float, warmup: float, max_layers: int):
        self.total_steps, self.num_layers = total_steps, num_layers
        g = torch.Generator().manual_seed(seed * 2_654_435_761 % 2**63)
        draws = torch.rand(total_steps, num_layers, generator=g) < rate
        first = math.floor(warmup * total_steps)
        draws[:first] = False
        mask = torch.zeros(total_steps, num_layers, dtype=torch.bool)
        count = [0] * total_steps
        for step, layer in draws.nonzero().tolist():
            target = self._place(mask, count, step, layer, first, max_layers)
            if target is not None:
                mask[target, layer] = True
                count[target] += 1
        self.mask = mask

    @staticmethod
    def _place(mask, count, step, layer, first, cap) -> int | None:
        def free(s: int) -> bool:
            return count[s] < cap and not mask[s, layer]

        if free(step):
            return step
        for s in range(step - 1, first - 1, -1):
            if free(s):
                return s
        for s in range(step + 1, len(count)):
            if free(s):
                return s
        return None

    def layers_at(self, step: int) -> frozenset[int]:
        if not 0 <= step < self.total_steps:
            return frozenset()
        return frozenset(self.mask[step].nonzero().flatten().tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "num_layers": self.num_layers, "mask": self.mask.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps, self.num_layers, self.mask = state["total_steps"], state["num_layers"], state["mask"]
