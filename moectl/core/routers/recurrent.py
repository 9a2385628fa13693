"""The layerwise recurrent router of RMoE (Qiu et al., 2024).

One recurrent cell, shared by every MoE layer, carries a small routing state from one layer's
router to the next; the recurrence runs over depth, per token, never over the sequence:

    x_i = P_i u_i                  per-layer projector d -> p (or one shared projector)
    h_i = Cell(x_i, h_{i-1})       the shared cell; h_0 = 0
    l_i = G_i h_i (+ a * l_{i-1})  per-layer router p -> E (optional logit residual)
    top-k of softmax(l_i), renormalised; balance loss on l_i

Nothing is detached by default, so a later layer's router loss reaches earlier layers'
projectors through the cell ("recurrent gradient"). The cell lives in `RecurrentCore`, which the
model owns once and hands to every router through the route context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.registry import option
from moectl.core.routers.base import (
    RouteContext,
    RouterOutput,
    register_router,
    routing_losses,
)
from moectl.core.routers.topk import SelectionOptions, TokenChoiceRouter

CELLS = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}
# Forward FLOPs of one cell step per token, in units of hidden^2: gates x (input + hidden matmuls) x 2.
CELL_FLOPS = {"gru": 3 * 2 * 2, "rnn": 1 * 2 * 2, "lstm": 4 * 2 * 2}


@dataclass
class RecurrentOptions(SelectionOptions):
    """RMoE's layerwise recurrent router: a cell shared by all MoE layers carries routing state
    across depth (per token); per-layer projector d -> hidden and router hidden -> experts."""

    hidden: int = option(128, "Recurrent state size p (the paper's best: 128).", gt=0)
    cell: Literal["gru", "rnn", "lstm"] = option("gru", "The shared recurrent cell.")
    pass_state: bool = option(
        True, "Pass the state from layer to layer; false = every layer starts from zero ('NP').")
    detach_state: bool = option(
        False, "Same forward, but no gradient flows into the previous layers' state (ablation).")
    logit_residual: float = option(
        0.0, "Add this multiple of the previous MoE layer's router logits ('r-alpha').", ge=0)
    shared_projector: bool = option(False, "One projector d -> hidden for all layers ('S-proj').")
    projector_bias: bool = option(False, "Give the projector a bias (the enwik8 variant).")
    output_bias: bool = option(
        False, "Give the router's output layer (hidden -> experts) a bias, as the enwik8 checkpoints' "
        "router_layer.bias.")


@dataclass
class RecurrentState:
    """What one MoE layer's router passes to the next."""

    h_TP: Tensor
    c_TP: Tensor | None       # LSTM cell state
    logits_TE: Tensor         # for the logit residual


class RecurrentCore(nn.Module):
    """The parts shared by all layers' recurrent routers: the cell, and optionally the projector."""

    component = "router"

    def __init__(self, d_model: int, options: RecurrentOptions):
        super().__init__()
        self.cell = CELLS[options.cell](options.hidden, options.hidden)
        self.projector = (nn.Linear(d_model, options.hidden, bias=options.projector_bias)
                          if options.shared_projector else None)

    def init_weights(self, std: float, out_std: float) -> None:
        # Every tensor of the cell, biases included, from N(0, std) (the paper's Megatron-style init).
        for p in self.parameters():
            nn.init.normal_(p, std=std)


@register_router("recurrent", options=RecurrentOptions)
class RecurrentRouter(TokenChoiceRouter):
    """Logits from a recurrent state carried through the MoE layers; top-k of their scores (softmax
    by default, or any other selection the router's options describe)."""

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        o = self.options
        self.hidden = o.hidden
        self.projector = None if o.shared_projector else nn.Linear(self.d_model, o.hidden, bias=o.projector_bias)
        self.add_gate(o.hidden)
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if o.output_bias else None

    @classmethod
    def shared_module(cls, args) -> RecurrentCore:
        return RecurrentCore(args.d_model, args.moe.router)

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        if moe.router.detach_state and not moe.router.pass_state:
            return [("router.detach_state", "has no effect with pass_state: false (there is no state to detach)")]
        return super().check(moe)

    def build_notes(self) -> list[str]:
        o = self.options
        biases = [name for name, on in (("projector", o.projector_bias), ("output", o.output_bias)) if on]
        return [f"recurrent router: {o.cell} cell of {o.hidden}, shared by every routed layer; "
                f"bias on {' and '.join(biases) if biases else 'neither the projector nor the output layer'}"
                f"{'' if o.pass_state else '; no state passed between layers'}.", *super().build_notes()]

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:   # zero, as the default scheme draws a linear layer's bias
            nn.init.zeros_(self.bias)
        if self.projector is not None:
            for p in self.projector.parameters():
                nn.init.normal_(p, std=std)

    def flops_per_token(self) -> int:
        p = self.hidden
        return 2 * self.d_model * p + CELL_FLOPS[self.options.cell] * p * p + 2 * p * self.num_experts

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: RecurrentState | None = None) -> RouterOutput:
        core = ctx.shared
        if not isinstance(core, RecurrentCore):
            raise ValueError("the recurrent router needs the model's RecurrentCore in ctx.shared")
        o = self.options
        T = x_TD.shape[0]
        with torch.autocast(x_TD.device.type, enabled=False):   # router math in fp32
            proj = self.projector if self.projector is not None else core.projector
            x_TP = F.linear(x_TD.float(), proj.weight.float(), None if proj.bias is None else proj.bias.float())
            if state is None or not o.pass_state:
                h_prev = x_TP.new_zeros(T, self.hidden)
                c_prev = x_TP.new_zeros(T, self.hidden) if o.cell == "lstm" else None
            else:
                h_prev, c_prev = state.h_TP, state.c_TP
            if o.detach_state:
                h_prev = h_prev.detach()
                c_prev = c_prev.detach() if c_prev is not None else None
            if o.cell == "lstm":
                h, c = core.cell(x_TP, (h_prev, c_prev))
            else:
                h, c = core.cell(x_TP, h_prev), None
            logits = F.linear(h, self.weight.float(), None if self.bias is None else self.bias.float())
            if o.logit_residual and state is not None:
                logits = logits + o.logit_residual * state.logits_TE
        ids, weights, probs = self.select(logits, ctx)
        return RouterOutput(ids, weights, probs, logits, aux_losses=routing_losses(probs, ids, logits, ctx),
                            state=RecurrentState(h, c, logits))
