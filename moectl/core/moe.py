"""The routed feed-forward layer: router + stacked expert bank + optional shared experts.

x_TD --router--> RouterOutput --capacity (optional)--> dispatch --experts--> combine (+ shared)

It is the one generic MoE layer; blocks made of several routed layers (CartesianMoE) are built
from it, and routed-layer variants (CompeteSMoE's competition) subclass it and reuse its pieces.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from moectl.core import registry
from moectl.core.experts import ExpertBank, run_experts
from moectl.core.layers import FeedForward
from moectl.core.losses import BalanceSpec
from moectl.core.routers.base import RouteContext, RouterOutput, fp32_linear, make_router
from moectl.core.stages import record_stage

if TYPE_CHECKING:
    from moectl.core.config import ModelArgs


@dataclass
class RoutingRecord:
    """What one routed layer reports for one forward: losses for the objective, statistics for logs.

    `losses` are unweighted; `loss` is their weighted sum (what the objective adds). Statistics are
    detached and stay on the device until someone reads them. `counters` are events a layer kind
    counts (summed over a logging window and reported under their names; a counter named
    "name/den" is reported as the share name = its sum / the sum of counter "den", which is then
    not reported itself); `extra_flops` is forward
    work beyond routing to top_k experts (hardware FLOPs, kept apart from model FLOPs and MFU)."""

    name: str
    losses: dict[str, Tensor]
    loss: Tensor
    load_E: Tensor           # routed slots per expert, after dropping
    slots: Tensor            # slots the router asked for
    dropped: Tensor          # slots dropped by the capacity limit
    entropy: Tensor          # mean routing entropy over tokens (nats)
    tokens: int
    topk_mass: Tensor | None = None   # mean routing probability of the slots a token used
    counters: dict[str, float] = field(default_factory=dict)
    extra_flops: int = 0


@dataclass
class RouteObservation:
    """One routed layer's decisions in one forward, for an observer (`RoutingMode.observer`).
    Tensors are detached; `valid_TK` is the validity after the capacity limit (None: every slot).
    It holds the layer's input: an observer keeps running sums, not observations."""

    layer: RoutedFFN
    x_TD: Tensor                 # the layer's input
    router_output: RouterOutput  # what the router returned for it
    valid_TK: Tensor | None
    token_ids_T: Tensor | None   # the forward's token ids

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def expert_ids_TK(self) -> Tensor:
        return self.router_output.expert_ids_TK

    @property
    def weights_TK(self) -> Tensor:
        return self.router_output.weights_TK

    @property
    def probs_TE(self) -> Tensor:
        return self.router_output.probs_TE

    @property
    def logits_TE(self) -> Tensor | None:
        return self.router_output.logits_TE

    @functools.cached_property
    def alternative(self) -> Tensor | None:
        """The experts [T, K] the layer's variant would choose for these tokens by its own mechanism
        (`RoutedFFN.alternative_choice`), or None when it has none. Computed when first asked."""
        with torch.no_grad():
            return self.layer.alternative_choice(self.x_TD, self.router_output)


class RoutingPlan(Protocol):
    """Per-forward routing decisions of a routed-layer variant (CompeteSMoE's competition
    schedule). The model asks `at(step)` once per training forward, outside any recomputed region,
    and passes the answer to every layer as `RouteContext.plan`; the trainer saves `state_dict()`
    in checkpoints and gives it back through `resume`."""

    def at(self, step: int) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def resume(self, state: dict[str, Any]) -> str | None:
        """Continue from a checkpoint's state; None when taken, else why it does not fit this run."""


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


class RouterContractError(RuntimeError):
    """A router returned something that breaks the contract of `RouterOutput`."""


@torch.compiler.disable   # reads values on the host, outside compiled graphs
def check_router_output(out: Any, router: nn.Module, T: int) -> None:
    """The shapes and dtypes every router must return (checked on a layer's first forward for
    moectl's own routers, on every forward for a plugin's, so a user's router that breaks the
    contract is named instead of failing somewhere downstream)."""
    who = f"router {getattr(router, 'kind', '?')!r} ({type(router).__module__}.{type(router).__qualname__})"
    if not isinstance(out, RouterOutput):
        raise RouterContractError(f"{who} returned a {type(out).__name__}, not a RouterOutput")
    E = router.num_experts
    ids, w, p = out.expert_ids_TK, out.weights_TK, out.probs_TE
    problems = []
    if not (isinstance(ids, Tensor) and ids.dtype == torch.int64 and ids.dim() == 2 and ids.shape[0] == T):
        problems.append(f"expert_ids_TK must be int64 [T={T}, K], got {_describe(ids)}")
    elif not (isinstance(w, Tensor) and w.shape == ids.shape):
        problems.append(f"weights_TK must have the shape of expert_ids_TK {tuple(ids.shape)}, got {_describe(w)}")
    if not (isinstance(p, Tensor) and p.shape == (T, E)):
        problems.append(f"probs_TE must be [T={T}, E={E}], got {_describe(p)}")
    if out.valid_TK is not None and not (isinstance(ids, Tensor) and out.valid_TK.shape == ids.shape):
        problems.append("valid_TK must have the shape of expert_ids_TK")
    if not problems and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        problems.append(f"expert ids must lie in 0..{E - 1}")
    if problems:
        raise RouterContractError(f"{who} breaks the router contract: " + "; ".join(problems))


def check_dropped_top1(out: RouterOutput, router: nn.Module) -> None:
    """Under the drop-top-1 perturbation: no token may use its most probable expert, and a router
    that gives every token top_k experts still does."""
    who = f"router {getattr(router, 'kind', '?')!r}"
    top1 = out.probs_TE.argmax(-1, keepdim=True)
    used = out.expert_ids_TK == top1
    if out.valid_TK is not None:
        used &= out.valid_TK
    if bool(used.any()):
        raise RouterContractError(f"{who} chose a token's most probable expert under drop_top1")
    if getattr(router, "fixed_k", False) and (out.expert_ids_TK.shape[1] != router.top_k or (
            out.valid_TK is not None and not bool(out.valid_TK.all()))):
        raise RouterContractError(f"{who} changed the number of experts per token under drop_top1")


def _describe(t: Any) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


class RoutedFFN(nn.Module):
    """One routed feed-forward layer on flattened tokens x_TD, configured by `args.moe`.

    Hooks a routed-layer variant may override: `make_plan` (per-forward routing decisions),
    `check` (recipe cross-field checks), `build_notes` and `expected_extra_flops_per_token` (what
    `moectl build` reports), and `alternative_choice` with `alternative_name` (its own way of
    choosing experts, which evaluation compares with the router's)."""

    component = "moe"
    kind = "routed"
    # What a variant's own way of choosing experts is called (see `alternative_choice`).
    alternative_name: str | None = None
    # The losses `scale_balance` scales (a variant adds its own balance losses).
    balance_losses: tuple[str, ...] = ("load_balance",)

    def __init__(self, args: ModelArgs, index: int = 0, name: str = ""):
        super().__init__()
        moe = args.moe
        self.name = name or f"R{index}"
        self.index = index   # ordinal among the model's routed layers (forward order)
        self.num_experts, self.top_k, self.capacity_factor = moe.num_experts, moe.top_k, moe.capacity_factor
        self.router = make_router(args, index)
        self.experts = ExpertBank(moe.num_experts, args.d_model, moe.expert_hidden, args.activation, moe.backend,
                                  active_fraction=moe.top_k / moe.num_experts, bias=moe.expert_bias)
        self.shared = None
        if moe.shared_experts:
            # n shared experts of width h are one always-on FFN of width n*h.
            width = moe.shared_experts * (moe.shared_hidden or moe.expert_hidden)
            self.shared = FeedForward(args.d_model, width, args.activation)
            self.shared.component = "shared_experts"
        # "mean": the average of the shared experts rather than their sum
        self.shared_scale = 1.0 / moe.shared_experts if moe.shared_reduce == "mean" and moe.shared_experts else 1.0
        self.shared_gate = None
        if moe.shared_experts and moe.shared_mix != "add":
            # "gate": a 2-way softmax between routed and shared output; "sigmoid": the shared
            # output scaled by sigmoid(w . x) (Qwen2-MoE).
            gated = moe.shared_mix == "gate"
            self.shared_gate = nn.Linear(args.d_model, 2 if gated else 1, bias=gated)
            self.shared_gate.component = "router"
        self.loss_weights = {"load_balance": moe.aux_loss_weight, "z_loss": moe.z_loss_weight}
        self._contract_checked = False

    def scale_balance(self, factor: float) -> None:
        """Multiply the weights of this layer's balance losses by `factor` (the model calls it with
        1 / number of routed layers when `balance_over_layers: mean`)."""
        for key in self.balance_losses:
            if key in self.loss_weights:
                self.loss_weights[key] *= factor

    # ----------------------------------------------------------------- hooks of variants

    @classmethod
    def make_plan(cls, args: ModelArgs, seed: int, total_steps: int, num_layers: int) -> RoutingPlan | None:
        """The per-forward routing plan of a training run, or None (the plain layer has none)."""
        return None

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        """Problems of a recipe's `model.moe` section that involve this variant."""
        return []

    def build_notes(self) -> list[str]:
        return []

    def regularisers(self, moe: Any) -> list[str]:
        """What `moectl build` says of this layer's auxiliary losses (`moe`: the model's MoEArgs)."""
        if not self.router.learned:
            return [f"no router losses ({self.router.kind} routing learns nothing)"]
        spec = BalanceSpec(moe.balance_form, moe.balance_pooling)
        over = "averaged over the routed layers" if moe.balance_over_layers == "mean" else "summed over layers"
        balance = (f"balance loss {moe.aux_loss_weight:g} x {spec.describe()}, {over}" if self.router.balance_loss
                   else f"no balance loss ({self.router.kind} balances by construction)")
        return [balance, f"z-loss {moe.z_loss_weight:g}" if moe.z_loss_weight else "no z-loss"]

    def expected_extra_flops_per_token(self, num_layers: int) -> float:
        """Average forward FLOPs per token this layer spends beyond top_k routing over a run."""
        return 0.0

    def alternative_choice(self, x_TD: Tensor, out: RouterOutput) -> Tensor | None:
        """The K experts [T, K] a variant's own mechanism would choose for these tokens, given the
        router's output for them, or None (the plain layer has no other mechanism). Evaluation
        measures how often the router agrees with it (docs/eval.md)."""
        return None

    # ----------------------------------------------------------------- the layer

    def init_weights(self, std: float, out_std: float) -> None:
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)
            if self.shared_gate.bias is not None:
                nn.init.zeros_(self.shared_gate.bias)

    def flops_per_token(self) -> int:
        d = self.experts.d_model
        flops = self.router.flops_per_token() + self.top_k * self.experts.flops_per_slot()
        if self.shared is not None:
            flops += self.shared.flops_per_token()
        if self.shared_gate is not None:
            flops += 2 * d * self.shared_gate.out_features
        return flops

    def run_router(self, x_TD: Tensor, ctx: RouteContext, state: Any) -> RouterOutput:
        out = self.router(x_TD, ctx, state)
        if not self._contract_checked:
            check_router_output(out, self.router, x_TD.shape[0])
            # The engine's own routers are tested to keep the contract: checked once. A plugin's router
            # is checked on every forward, so one that breaks it later is named, not a crash downstream.
            self._contract_checked = type(self.router).__module__.startswith("moectl.core.")
        if ctx.mode.drop_top1:
            check_dropped_top1(out, self.router)
        return out

    def route(self, x_TD: Tensor, ctx: RouteContext, state: Any) -> tuple[RouterOutput, Tensor | None]:
        """Router decision plus the capacity limit. Returns (output, validity mask after dropping)."""
        out = self.run_router(x_TD, ctx, state)
        valid = out.valid_TK
        if self.capacity_factor is not None and not ctx.mode.decoding:
            T, K = out.expert_ids_TK.shape
            cap = math.ceil(self.capacity_factor * T * self.top_k / self.num_experts)
            valid = apply_capacity(out.expert_ids_TK, valid, self.num_experts, cap)
        return out, valid

    def mix_shared(self, routed_TD: Tensor, x_TD: Tensor) -> Tensor:
        if self.shared is None:
            return routed_TD
        with record_stage("shared_experts"):
            return self._mix_shared(routed_TD, x_TD)

    def _mix_shared(self, routed_TD: Tensor, x_TD: Tensor) -> Tensor:
        shared_TD = self.shared(x_TD)
        if self.shared_scale != 1.0:
            shared_TD = shared_TD * self.shared_scale
        if self.shared_gate is None:
            return routed_TD + shared_TD
        gate = self.shared_gate
        g = fp32_linear(x_TD, gate.weight, gate.bias)   # router math in fp32
        if g.shape[-1] == 1:
            return routed_TD + g.sigmoid().to(routed_TD.dtype) * shared_TD
        c = g.softmax(-1).to(routed_TD.dtype)
        return c[:, :1] * routed_TD + c[:, 1:] * shared_TD

    def record(self, losses: dict[str, Tensor], probs_TE: Tensor, slots_TK: Tensor, asked_TK: Tensor | None,
               kept_TK: Tensor | None, load_E: Tensor, counters: dict[str, float] | None = None,
               extra_flops: int = 0) -> RoutingRecord:
        """The layer's record: `losses` unweighted (weighted here), `slots_TK` the routed slots,
        `asked_TK` / `kept_TK` their validity before / after the capacity limit (None: all)."""
        weighted = [self.loss_weights[k] * v for k, v in losses.items() if self.loss_weights.get(k, 0) > 0]
        loss = torch.stack(weighted).sum() if weighted else load_E.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            T, K = slots_TK.shape
            asked = asked_TK.sum() if asked_TK is not None else torch.tensor(T * K, device=load_E.device)
            kept = kept_TK.sum() if kept_TK is not None else asked
            p = probs_TE.detach()
            entropy = -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
            used = kept_TK if kept_TK is not None else asked_TK
            mass = p.gather(1, slots_TK)
            mass = (mass if used is None else mass * used).sum(-1).mean()
        return RoutingRecord(self.name, {k: v.detach() for k, v in losses.items()}, loss,
                             load_E.detach().float(), asked.float(), (asked - kept).float(), entropy, T,
                             mass, dict(counters or {}), extra_flops)

    def observe(self, ctx: RouteContext, x_TD: Tensor, out: RouterOutput, valid: Tensor | None) -> None:
        """Hand this forward's decisions to the mode's observer, if one is listening."""
        observer = ctx.mode.observer
        if observer is None:
            return
        detached = RouterOutput(out.expert_ids_TK.detach(), out.weights_TK.detach(), out.probs_TE.detach(),
                                out.logits_TE.detach() if out.logits_TE is not None else None, out.valid_TK)
        observer(RouteObservation(self, x_TD.detach(), detached, valid, ctx.token_ids_T))

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> tuple[Tensor, Any, RoutingRecord]:
        with record_stage("router"):
            out, valid = self.route(x_TD, ctx, state)
            self.observe(ctx, x_TD, out, valid)
            weights = out.weights_TK if valid is None else out.weights_TK * valid
        y_TD, load_E = run_experts(self.experts, x_TD, out.expert_ids_TK, weights, valid)
        with record_stage("router"):   # statistics and losses of the routing
            record = self.record(out.aux_losses, out.probs_TE, out.expert_ids_TK, out.valid_TK, valid, load_E)
        return self.mix_shared(y_TD, x_TD), out.state, record


registry.variants.base = RoutedFFN


def register_variant(name: str, *, options: type, summary: str):
    """Class decorator: a RoutedFFN subclass that replaces the plain routed layer when the recipe
    sets `model.moe.<name>` (a section of `options`); `summary` describes that key."""
    return registry.variants.register(name, options=options, summary=summary)


def routed_layer_class(args: ModelArgs) -> type[RoutedFFN]:
    """The routed-layer class of a model: its variant's, else the plain RoutedFFN."""
    variant = args.moe.variant if args.moe else None
    return RoutedFFN if variant is None else registry.variants.of(variant).cls
