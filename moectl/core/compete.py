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
from moectl.core.losses import load_balance_loss
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
        """Whether this forward competes: the model's schedule put this layer in `ctx.compete`, and
        this is a training forward with gradients (never in evaluation)."""
        return self.training and torch.is_grad_enabled() and self.index in ctx.compete

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
        losses = {
            "router_distill": router_distillation_loss(out.probs_TE, p_comp, win_TK, c.theta),
            "diversity": diversity_loss(o_win_TKD),
            # f from each token's first choice; P = mean softmax(s), not detached (see docs/methods.md)
            "compete_balance": load_balance_loss(p_comp, win_TK[:, :1], reduce=ctx.reduce_counts),
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


def place_draws(draws: Tensor, first: int, cap: int) -> Tensor:
    """Place drawn (step, layer) pairs under a cap of `cap` layers per step. Draws are taken in
    step order; one that finds its step full (or, after a move, the layer already there) moves
    to the nearest earlier step with room (not before `first`), else the nearest later one, else
    it is dropped. Returns the [steps, layers] mask."""
    steps, layers = draws.shape
    count = [0] * steps
    taken = [set() for _ in range(steps)]
    # Full steps are skipped in O(1) amortised: left[s] / right[s] point towards the nearest step
    # that may still have room (path-compressed), so a crowded schedule stays fast.
    left, right = list(range(steps)), list(range(steps))

    def find(links: list[int], s: int) -> int:
        root = s
        while 0 <= root < steps and links[root] != root:
            root = links[root]
        while 0 <= s < steps and links[s] != s:
            links[s], s = root, links[s]
        return root

    def take(s: int, layer: int) -> None:
        count[s] += 1
        taken[s].add(layer)
        if count[s] == cap:          # full: later searches jump over it
            left[s], right[s] = s - 1, s + 1

    for step, layer in draws.nonzero().tolist():
        if count[step] < cap and layer not in taken[step]:
            take(step, layer)
            continue
        s = find(left, step - 1)
        while s >= first and layer in taken[s]:
            s = find(left, s - 1)
        if s < first:
            s = find(right, step + 1)
            while s < steps and layer in taken[s]:
                s = find(right, s + 1)
        if first <= s < steps:
            take(s, layer)
    mask = torch.zeros(steps, layers, dtype=torch.bool)
    for s, held in enumerate(taken):
        if held:
            mask[s, sorted(held)] = True
    return mask


class CompetitionSchedule:
    """Which routed layers compete at which step (the 2025 mechanism), drawn once from the seed.

    After a warm-up fraction with no competition, each layer competes at each step with
    probability `rate`; at most `max_layers` compete in one step (see `place_draws`). The same seed
    gives the same schedule on every process; it is saved in checkpoints."""

    kind = "fixed"

    def __init__(self, seed: int, total_steps: int, num_layers: int, rate: float, warmup: float, max_layers: int):
        self.total_steps, self.num_layers = total_steps, num_layers
        g = torch.Generator().manual_seed(seed * 2_654_435_761 % 2**63)
        draws = torch.rand(total_steps, num_layers, generator=g) < rate
        first = math.floor(warmup * total_steps)
        draws[:first] = False
        self.mask = place_draws(draws, first, max_layers)

    def layers_at(self, step: int) -> frozenset[int]:
        if not 0 <= step < self.total_steps:
            return frozenset()
        return frozenset(self.mask[step].nonzero().flatten().tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_steps": self.total_steps, "num_layers": self.num_layers,
                "mask": self.mask.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps, self.num_layers, self.mask = state["total_steps"], state["num_layers"], state["mask"]

    def resume(self, state: dict[str, Any]) -> bool:
        """Continue a checkpoint's schedule when it is one for this run (same kind, length and
        layers); False when it is not (this schedule, drawn from the seed, stays)."""
        if (state.get("kind", "fixed"), state["total_steps"], state["num_layers"]) != \
                (self.kind, self.total_steps, self.num_layers):
            return False
        self.load_state_dict(state)
        return True


class BernoulliCompetition:
    """The 2024 mechanism: a fresh Bernoulli(rate) draw per layer at every training forward (each
    micro-batch), no cap; no competition during the warm-up fraction of steps.

    The draws come from a generator seeded by the run's seed, so every data-parallel process
    draws the same layers (their collectives stay in step); the model draws once per forward,
    outside any recomputed region, and the generator state is saved in checkpoints."""

    kind = "bernoulli"

    def __init__(self, seed: int, total_steps: int, num_layers: int, rate: float, warmup: float):
        self.total_steps, self.num_layers, self.rate = total_steps, num_layers, rate
        self.first = math.floor(warmup * total_steps)
        self.generator = torch.Generator().manual_seed(seed * 2_654_435_761 % 2**63 + 1)

    def layers_at(self, step: int) -> frozenset[int]:
        draw = torch.rand(self.num_layers, generator=self.generator) < self.rate   # advances every call
        if step < self.first:
            return frozenset()
        return frozenset(draw.nonzero().flatten().tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_steps": self.total_steps, "num_layers": self.num_layers,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def resume(self, state: dict[str, Any]) -> bool:
        """Continue a checkpoint's draws (same kind and layers); False when they are not this run's."""
        if (state.get("kind"), state["num_layers"]) != (self.kind, self.num_layers):
            return False
        self.load_state_dict(state)
        return True


def make_schedule(args: CompetitionArgs, seed: int, total_steps: int,
                  num_layers: int) -> CompetitionSchedule | BernoulliCompetition:
    """The competition schedule of a run with these settings."""
    if args.schedule == "bernoulli":
        return BernoulliCompetition(seed, total_steps, num_layers, args.rate, args.warmup)
    return CompetitionSchedule(seed, total_steps, num_layers, args.rate, args.warmup, args.max_layers)
