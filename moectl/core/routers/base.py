"""The router contract shared by every routing method.

Shape suffixes used across moectl's code (the one legend; docs/engine.md points here):
  B batch, S sequence, T tokens in the flattened batch (B*S), D model width, E experts,
  K routed slots per token, F expert hidden width, N = T*K routed slots, V vocabulary,
  P a recurrent router's state width.  `x_TD` is a [T, D] tensor, `logits_TE` a [T, E] one.

A router maps normalised tokens x_TD to a `RouterOutput`: for each token K expert ids and their
combine weights (with a validity mask when a token uses fewer than K experts), the fp32 routing
probabilities over all experts, unweighted auxiliary losses, and the next recurrent routing state.
The MoE block never looks at the router's kind. A router is registered with its options dataclass
(`@register_router("name", options=...)`, see `moectl.core.registry`) and built by `make_router`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moectl.core import registry
from moectl.core.losses import SWITCH_BATCH, BalanceSpec, balance_loss, z_loss

if TYPE_CHECKING:
    from moectl.core.config import ModelArgs


@dataclass(frozen=True)
class RoutingMode:
    """How a forward routes when it is not a plain forward: for evaluation and decoding. A mode
    changes no weight. The model takes one (`MoETransformer.forward(..., mode=...)`) and hands it to
    every layer in the `RouteContext`.

    `decoding`: route every token as it would be routed alone (token-by-token decoding with a KV
    cache): batch-dependent routing steps, the capacity limit, are skipped. A forward with a cache
    always decodes.
    `drop_top1`: the routing-robustness perturbation. Every router leaves out each token's most
    probable expert and chooses its K experts from the rest (`Router.top1_excluded` gives the mask).
    `observer`: receives every routed layer's decisions (a `moectl.core.moe.RouteObservation`);
    `moectl.eval.routing.RoutingAnalysis` is such an observer."""

    decoding: bool = False
    drop_top1: bool = False
    observer: Callable[[Any], None] | None = None


PLAIN = RoutingMode()


@dataclass
class RouteContext:
    """Per-forward facts that some routers need. Built once by the model for all layers."""

    token_ids_T: Tensor | None = None   # input token ids (hash routing)
    shared: nn.Module | None = None     # a module shared by the routers of all layers
    # Sums per-expert slot counts over data-parallel ranks (set by the trainer), so balance losses
    # see the global batch and results do not depend on the number of processes.
    reduce_counts: Callable[[Tensor], Tensor] | None = None
    # What the model's routing plan decided for this training forward (None outside training);
    # its meaning belongs to the routed-layer variant that made the plan (see `RoutingPlan`).
    plan: Any = None
    mode: RoutingMode = PLAIN           # evaluation and decoding (see `RoutingMode`)
    # The model's balance loss (`model.moe.balance_form` / `balance_pooling`), which
    # `routing_losses` computes, and the length of the forward's sequences (for per-sequence pooling).
    balance: BalanceSpec = SWITCH_BATCH
    seq_len: int | None = None


@dataclass
class RouterOutput:
    expert_ids_TK: Tensor                # int64 [T, K]
    weights_TK: Tensor                   # fp32  [T, K]; 0 where a slot is invalid
    probs_TE: Tensor                     # fp32  [T, E]; routing distribution (rows sum to 1)
    logits_TE: Tensor | None = None      # fp32  [T, E]; None when nothing is learned
    valid_TK: Tensor | None = None       # bool  [T, K]; None = every slot is used
    aux_losses: dict[str, Tensor] = field(default_factory=dict)   # unweighted scalars
    state: Any = None                    # recurrent routing state for the next MoE layer


class Router(nn.Module):
    """Base class of routers: the sizes every router needs, its options, and class-level hooks.

    Subclasses implement `forward(x_TD, ctx, state) -> RouterOutput` and may override:
      `shared_module(args)`   a module the routers of all layers share (RMoE's cell)
      `check(moe)`            cross-field checks on the recipe's `model.moe` section
      `build_notes()`         lines `moectl build` prints about this router
      `after_step(load_E)`    adapt after each optimizer step (aux-loss-free biases)
    """

    component = "router"
    kind = ""            # the registered name (set by `register_router`)
    fixed_k = False      # True when every token always gets exactly top_k experts
    learned = True       # False when nothing in the router is trained (hash)
    # Why the routing-robustness perturbation (`RoutingMode.drop_top1`) is not defined for this
    # router, or None when its forward honours it (use `top1_excluded`).
    drop_top1_refusal: str | None = ("it does not declare support for the drop-top-1 perturbation (a router "
                                     "that honours RoutingMode.drop_top1 sets drop_top1_refusal = None)")
    causal = True        # False when a token's routing depends on other tokens of the batch
    balance_loss = True  # False when the router returns no load-balance loss (it balances by construction)

    def __init__(self, args: ModelArgs, index: int = 0):
        super().__init__()
        moe = args.moe
        self.options = moe.router
        self.d_model, self.num_experts, self.top_k = args.d_model, moe.num_experts, moe.top_k
        self.vocab_size = args.vocab_size
        self.index = index   # ordinal among the model's routed layers (forward order)

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        raise NotImplementedError

    @classmethod
    def shared_module(cls, args: ModelArgs) -> nn.Module | None:
        """A module that the routers of all layers share (built once by the model and passed in
        `RouteContext.shared`), or None."""
        return None

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        """Problems of a recipe's `model.moe` section that involve this router, as
        (key path under model.moe, message) pairs."""
        return []

    def build_notes(self) -> list[str]:
        if self.fixed_k:
            return []
        return [f"{self.kind} gives tokens a varying number of experts: active parameters and FLOPs assume "
                f"the nominal top_k = {self.top_k}; logs report the measured mean (experts_per_token)."]

    def top1_excluded(self, probs_TE: Tensor, ctx: RouteContext) -> Tensor | None:
        """Under the drop-top-1 perturbation, a bool mask [T, E] of each token's most probable
        expert (which the router must not choose); otherwise None."""
        if not ctx.mode.drop_top1:
            return None
        mask = torch.zeros_like(probs_TE, dtype=torch.bool)
        return mask.scatter_(-1, probs_TE.argmax(-1, keepdim=True), True)

    def add_gate(self, in_features: int | None = None) -> None:
        """The learned gate `weight` [E, in_features] (default in_features: d_model)."""
        self.weight = nn.Parameter(torch.empty(self.num_experts, in_features or self.d_model))

    def gate_logits(self, x_TD: Tensor) -> Tensor:
        return fp32_linear(x_TD, self.weight)

    def init_weights(self, std: float, out_std: float) -> None:
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, std=std)

    def flops_per_token(self) -> int:
        """Forward FLOPs of computing the routing scores for one token."""
        return 2 * self.d_model * self.num_experts

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        """Called after each optimizer step with the expert loads of that step (slot counts)."""


def fp32_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) in fp32, also under autocast (which would otherwise run it in bf16)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


def routing_losses(probs_TE: Tensor, expert_ids_TK: Tensor, logits_TE: Tensor, ctx: RouteContext,
                   valid_TK: Tensor | None = None) -> dict[str, Tensor]:
    """The standard unweighted router losses: the model's balance loss (`ctx.balance`, the Switch
    loss over the batch by default) and the z-loss."""
    balance = balance_loss(probs_TE, expert_ids_TK, ctx.balance, valid_TK=valid_TK, seq_len=ctx.seq_len,
                           reduce=ctx.reduce_counts)
    return {"load_balance": balance, "z_loss": z_loss(logits_TE)}


registry.routers.base = Router


def register_router(name: str, *, options: type):
    """Class decorator: make a Router subclass selectable as `model.moe.router.kind: name`."""
    return registry.routers.register(name, options=options)


def router_registry() -> dict[str, type[Router]]:
    """Every registered router class by name (importing moectl.core registers the built-ins)."""
    return {e.name: e.cls for e in registry.routers}


def make_router(args: ModelArgs, index: int = 0) -> Router:
    """The router `args.moe.router` (an options instance) selects, for routed layer `index`."""
    return registry.routers.of(args.moe.router).cls(args, index)
