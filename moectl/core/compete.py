"""CompeteSMoE (Pham et al., 2024; Nguyen et al., 2025): competition by neural response.

On a competition step a layer evaluates every expert and routes each token to the K experts with
the strongest response, weighting them by their responses. The router, which the competition
step does not use, learns to predict the competition's outcome (router distillation); every
other step routes with the router as usual. Competition runs only on scheduled (layer, step)
pairs during training, never in evaluation.

    o_i = E_i(x) for all experts            s_i = mean(softplus(o_i))  (or ||o_i||_2)
                                            (combine_gate: s_i = (s_i + router logit_i) / 2)
    win = top-K of s                        w_i = s_i / sum_win s     (or softmax over winners)
    y   = sum_win w_i o_i
    L_rt  = MSE(p_R, p_C) + theta * MSE(p_R[win], p_C[win])   p_R = softmax(router logits),
                                                              p_C = softmax(s), detached
                                                              (target winners: softmax over
                                                              the winners' s, 0 elsewhere)
    L_div = mean over tokens of the winners' pairwise cosine similarities (diagonal zeroed, / K^2)
    L_bal = E * sum_e f_e * P_e, f from each token's first choice, P = mean softmax(s)
            (the form, pooling and distribution are options: balance_form, balance_pooling,
            balance_scores; the 2025 language-model code: entropy form per sequence on softmax(softmax(s)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from moectl.core import registry
from moectl.core.losses import BalanceSpec, balance_loss
from moectl.core.moe import RoutedFFN, RoutingRecord, register_variant
from moectl.core.registry import option
from moectl.core.routers.base import RouteContext
from moectl.core.stages import record_stage


@dataclass
class CompetitionOptions:
    """CompeteSMoE: on scheduled (layer, step) pairs in training, evaluate every expert and route to
    the strongest responses; the router learns to predict them. Defaults follow the 2025 paper."""

    rate: float = option(0.07, "Probability that a MoE layer competes at a step (omega).", ge=0, le=1)
    warmup: float = option(0.05, "Fraction of training steps, at the start, without competition.", ge=0, le=1)
    max_layers: int = option(3, "Most layers competing in one step (A_max; fixed schedule).", gt=0)
    schedule: Literal["fixed", "bernoulli"] = option(
        "fixed", "'fixed': drawn once from the seed, capped, saved in checkpoints (2025); "
        "'bernoulli': a fresh draw per layer and training forward from the seed, no cap (2024).")
    response: Literal["mean_softplus", "l2_norm"] = option(
        "mean_softplus", "An expert's response to a token: mean softplus of its output (2025) or its L2 norm (2024).")
    gate: Literal["linear", "softmax"] = option(
        "linear", "Winners' weights: responses divided by their sum (2025) or their softmax (2024).")
    target: Literal["all", "winners"] = option(
        "all", "Router distillation target: the softmax of every expert's response (2025) or the softmax over "
        "the winners' responses only, 0 for the other experts (the 2024 code).")
    combine_gate: bool = option(
        False, "Score experts by the mean of their response and the router's logit (the 2024 code's "
        "combine_gate, used for enwik8 size L); needs gate 'softmax'.")
    theta: float = option(0.2, "Weight of the winners-only term of the router loss.", ge=0)
    router_loss_weight: float = option(0.001, "Weight of the router distillation loss.", ge=0)
    diversity_weight: float = option(0.005, "Weight of the winners' diversity loss.", ge=0)
    balance_weight: float = option(0.01, "Weight of the competition balance loss.", ge=0)
    balance_form: Literal["switch", "switch_top1", "entropy"] = option(
        "switch_top1", "Form of the competition balance loss (as model.moe.balance_form): Switch over all K winners, "
        "Switch over each token's first winner (the authors' vision code), or the entropy form (the 2025 "
        "language-model code).")
    balance_pooling: Literal["batch", "sequence"] = option(
        "batch", "Pooling of the competition balance loss: over the batch, or per sequence (the 2025 "
        "language-model code).")
    balance_scores: Literal["softmax", "double_softmax"] = option(
        "softmax", "The distribution the competition balance loss sees: the softmax of the responses, or the "
        "softmax of that softmax, which is what the 2025 language-model code computes (its entropy balance "
        "applies a log-softmax to probabilities).")


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


def competition_target(s_TE: Tensor, win_TK: Tensor, target: str) -> Tensor:
    """p_C, the distribution the router learns to predict: softmax of every response ("all") or of
    the winners' responses alone, zero for the rest ("winners")."""
    if target == "all":
        return s_TE.softmax(-1)
    masked = torch.full_like(s_TE, -math.inf).scatter(-1, win_TK, s_TE.gather(-1, win_TK))
    return masked.softmax(-1)


def agreement(router_ids_TK: Tensor, win_TK: Tensor) -> dict[str, Tensor]:
    """How far the router agrees with the competition on these tokens, as counts for the training log:
    tokens whose most probable router expert is the competition's first winner, and the sum over tokens
    of |router's K experts ∩ winners| / K, each over the competing tokens (shares in the log)."""
    same_top1 = (router_ids_TK[:, 0] == win_TK[:, 0]).sum()
    overlap = (router_ids_TK.unsqueeze(-1) == win_TK.unsqueeze(-2)).any(-1).float().mean(-1).sum()
    return {"compete_tokens": float(win_TK.shape[0]), "compete_agree_top1/compete_tokens": same_top1.float(),
            "compete_agree_overlap/compete_tokens": overlap}


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


@register_variant("competition", options=CompetitionOptions,
                  summary="CompeteSMoE competition settings; null = none.")
class CompeteFFN(RoutedFFN):
    """A routed FFN that competes on scheduled steps and routes with its router otherwise."""

    alternative_name = "competition"
    balance_losses = ("load_balance", "compete_balance")
    # Runs under expert parallelism: its competition steps reach every expert through the bank's
    # forward_all, which the exchange serves (moectl.train.expert_parallel.AllToAllExchange.every_expert).
    expert_parallel = True

    def __init__(self, args, index: int = 0, name: str = ""):
        super().__init__(args, index, name)
        c = self.competition = args.moe.variant
        self.loss_weights.update(router_distill=c.router_loss_weight, diversity=c.diversity_weight,
                                 compete_balance=c.balance_weight)
        self.compete_balance = BalanceSpec(c.balance_form, c.balance_pooling)
        if c.balance_scores not in ("softmax", "double_softmax"):
            raise ValueError(f"unknown competition balance_scores {c.balance_scores!r}; known: softmax, double_softmax")

    @classmethod
    def make_plan(cls, args, seed: int, total_steps: int, num_layers: int):
        """Which layers compete at which step: drawn from the seed, the same on every process."""
        c = args.moe.variant
        if c.schedule == "bernoulli":
            return BernoulliCompetition(seed, total_steps, num_layers, c.rate, c.warmup)
        return CompetitionSchedule(seed, total_steps, num_layers, c.rate, c.warmup, c.max_layers)

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        router = registry.routers.get(moe.router.kind).cls
        if not (router.fixed_k and router.learned):
            return [("competition", "competition distils into a learned router that gives every token top_k "
                                    f"experts (such as topk or recurrent), not {moe.router.kind!r}")]
        c = getattr(moe, "competition", None)
        if c is not None and c.combine_gate and c.gate != "softmax":
            return [("competition.combine_gate", "a combined score (response + router logit) can be negative, so its "
                     "winners' weights need gate: softmax, not 'linear'")]
        if getattr(moe.router, "bias_update_rate", 0) > 0:
            return [("router.bias_update_rate", "aux-loss-free balancing does not combine with competition: on "
                     "competition steps the loads are the competition's choices, not the router's; set it to 0")]
        return []

    def extra_flops_per_token(self) -> int:
        """Forward FLOPs a competition adds over routing to top_k experts."""
        return (self.num_experts - self.top_k) * self.experts.flops_per_slot()

    def expected_extra_flops_per_token(self, num_layers: int) -> float:
        c = self.competition
        cap = c.max_layers if c.schedule == "fixed" else num_layers
        share = min(c.rate * num_layers, cap) / num_layers
        return (1 - c.warmup) * share * self.extra_flops_per_token()

    def regularisers(self, moe: Any) -> list[str]:
        c = self.competition
        scores = "softmax(softmax(responses))" if c.balance_scores == "double_softmax" else "softmax(responses)"
        return [*super().regularisers(moe),
                f"on competition steps: router distillation {c.router_loss_weight:g}, "
                f"diversity {c.diversity_weight:g}, balance {c.balance_weight:g} x {self.compete_balance.describe()} "
                f"on {scores}{', averaged over the routed layers' if moe.balance_over_layers == 'mean' else ''} "
                "(no router balance or z-loss)"]

    def build_notes(self) -> list[str]:
        return ["competition: on its scheduled steps a layer runs every expert; that work is counted apart from "
                "the model's FLOPs."]

    def competes(self, ctx: RouteContext) -> bool:
        """Whether this forward competes: the model's plan put this layer in `ctx.plan`, and this is
        a training forward with gradients (never in evaluation)."""
        return self.training and torch.is_grad_enabled() and ctx.plan is not None and self.index in ctx.plan

    def scores(self, o_ETD: Tensor, router_logits_TE: Tensor | None) -> Tensor:
        """The competition's score of each expert for each token, [T, E] fp32: its response, or with
        `combine_gate` the mean of the response and the router's logit."""
        s_TE = responses(o_ETD, self.competition.response)
        if self.competition.combine_gate and router_logits_TE is not None:
            s_TE = 0.5 * s_TE + 0.5 * router_logits_TE.float()
        return s_TE

    def competition_balance(self, s_TE: Tensor, win_TK: Tensor, ctx: RouteContext) -> Tensor:
        """The competition balance loss (unweighted): `balance_form` and `balance_pooling` on the
        softmax of the responses (`balance_scores`), counts from the winners; the softmax is not
        detached, so the loss reaches the experts through their responses (docs/methods.md)."""
        p_TE = s_TE.softmax(-1)
        if self.competition.balance_scores == "double_softmax":
            p_TE = p_TE.softmax(-1)
        return balance_loss(p_TE, win_TK, self.compete_balance, seq_len=ctx.seq_len, reduce=ctx.reduce_counts)

    @torch.no_grad()
    def alternative_choice(self, x_TD: Tensor, out) -> Tensor:
        """The experts a competition would pick for these tokens (every expert is evaluated)."""
        return self.scores(self.experts.forward_all(x_TD), out.logits_TE).topk(self.top_k, dim=-1).indices

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> tuple[Tensor, Any, RoutingRecord]:
        if not self.competes(ctx):
            return super().forward(x_TD, ctx, state)
        c = self.competition
        with record_stage("router"):
            out = self.run_router(x_TD, ctx, state)          # used only for distillation (and its state)
        with record_stage("experts"):
            o_ETD = self.experts.forward_all(x_TD)
        with record_stage("router"):   # the competition decides
            s_TE = self.scores(o_ETD, out.logits_TE)
            win_TK, w_TK = competition_gates(s_TE, self.top_k, c.gate)
        T = x_TD.shape[0]
        with record_stage("combine"):
            o_TED = o_ETD.transpose(0, 1)
            o_win_TKD = o_TED.gather(1, win_TK.unsqueeze(-1).expand(-1, -1, o_TED.shape[-1]))
            y_TD = (o_win_TKD * w_TK.to(o_win_TKD.dtype).unsqueeze(-1)).sum(1)
        p_comp = competition_target(s_TE, win_TK, c.target)
        # The router's own balance and z losses are left out: on a competition step the router
        # learns from the distillation loss (and, with combine_gate, through its logits in the
        # winners' scores and weights, as in the 2024 code).
        losses = {
            "router_distill": router_distillation_loss(out.probs_TE, p_comp, win_TK, c.theta),
            "diversity": diversity_loss(o_win_TKD),
            "compete_balance": self.competition_balance(s_TE, win_TK, ctx),
        }
        load_E = torch.bincount(win_TK.reshape(-1), minlength=self.num_experts)
        counters = {"competitions": 1, **agreement(out.expert_ids_TK.detach(), win_TK)}
        record = self.record(losses, out.probs_TE, win_TK, None, None, load_E, counters=counters,
                             extra_flops=self.extra_flops_per_token() * T)
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

    def at(self, step: int) -> frozenset[int]:
        """The routed layers that compete at `step`."""
        if not 0 <= step < self.total_steps:
            return frozenset()
        return frozenset(self.mask[step].nonzero().flatten().tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_steps": self.total_steps, "num_layers": self.num_layers,
                "mask": self.mask.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps, self.num_layers, self.mask = state["total_steps"], state["num_layers"], state["mask"]

    def resume(self, state: dict[str, Any]) -> str | None:
        """Continue a checkpoint's schedule when it is one for this run (same kind, length and
        layers); else say why not (this schedule, drawn from the seed, stays)."""
        theirs = (state.get("kind"), state.get("total_steps"), state.get("num_layers"))
        if theirs != (self.kind, self.total_steps, self.num_layers):
            return (f"the checkpoint's competition schedule ({theirs[0]}, {theirs[1]} steps, {theirs[2]} layers) "
                    f"is not this run's ({self.kind}, {self.total_steps} steps, {self.num_layers} layers)")
        self.load_state_dict(state)
        return None


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

    def at(self, step: int) -> frozenset[int]:
        """The routed layers that compete in this forward (a fresh draw on every call)."""
        draw = torch.rand(self.num_layers, generator=self.generator) < self.rate   # advances every call
        if step < self.first:
            return frozenset()
        return frozenset(draw.nonzero().flatten().tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_steps": self.total_steps, "num_layers": self.num_layers,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def resume(self, state: dict[str, Any]) -> str | None:
        """Continue a checkpoint's draws (same kind and layers); else say why not."""
        theirs = (state.get("kind"), state.get("num_layers"))
        if theirs != (self.kind, self.num_layers):
            return (f"the checkpoint's competition draws ({theirs[0]}, {theirs[1]} layers) are not this run's "
                    f"({self.kind}, {self.num_layers} layers)")
        self.load_state_dict(state)
        return None
