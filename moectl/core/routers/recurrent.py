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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.losses import load_balance_loss, z_loss
from moectl.core.routers.base import RouteContext, Router, RouterOutput, register_router
from moectl.core.routers.topk import select_topk

CELLS = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}
# Forward FLOPs of one cell step per token, in units of hidden^2: gates x (input + hidden matmuls) x 2.
CELL_FLOPS = {"gru": 3 * 2 * 2, "rnn": 1 * 2 * 2, "lstm": 4 * 2 * 2}


@dataclass
class RecurrentState:
    """What one MoE layer's router passes to the next."""

    h_TP: Tensor
    c_TP: Tensor | None       # LSTM cell state
    logits_TE: Tensor         # for the logit residual


class RecurrentCore(nn.Module):
    """The parts shared by all layers' recurrent routers: the cell, and optionally the projector."""

    component = "router"

    def __init__(self, d_model: int, hidden: int, cell: str, shared_projector: bool, projector_bias: bool):
        super().__init__()
        self.cell_kind = cell
        self.cell = CELLS[cell](hidden, hidden)
        self.projector = nn.Linear(d_model, hidden, bias=projector_bias) if shared_projector else None

    def init_weights(self, std: float, out_std: float) -> None:
        # Every tensor of the cell, biases included, from N(0, std) (the paper's Megatron-style init).
        for p in self.parameters():
            nn.init.normal_(p, std=std)


@register_router("recurrent")
class RecurrentRouter(Router):
    fixed_k = True

    def __init__(self, *, hidden: int = 128, cell: str = "gru", pass_state: bool = True,
                 detach_state: bool = False, logit_residual: float = 0.0, shared_projector: bool = False,
                 projector_bias: bool = False, renormalize: bool = True, **common: Any):
        super().__init__(**common)
        self.hidden, self.cell_kind = hidden, cell
        self.pass_state, self.detach_state = pass_state, detach_state
        self.logit_residual, self.renormalize = logit_residual, renormalize
        self.projector = None if shared_projector else nn.Linear(self.d_model, hidden, bias=projector_bias)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden))

    @classmethod
    def shared_module(cls, *, d_model: int, hidden: int = 128, cell: str = "gru", shared_projector: bool = False,
                      projector_bias: bool = False, **_: Any) -> RecurrentCore:
        return RecurrentCore(d_model, hidden, cell, shared_projector, projector_bias)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.projector is not None:
            for p in self.projector.parameters():
                nn.init.normal_(p, std=std)

    def flops_per_token(self) -> int:
        p = self.hidden
        return 2 * self.d_model * p + CELL_FLOPS[self.cell_kind] * p * p + 2 * p * self.num_experts

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: RecurrentState | None = None) -> RouterOutput:
        core = ctx.shared
        if not isinstance(core, RecurrentCore):
            raise ValueError("the recurrent router needs the model's RecurrentCore in ctx.shared")
        T = x_TD.shape[0]
        with torch.autocast(x_TD.device.type, enabled=False):   # router math in fp32
            proj = self.projector if self.projector is not None else core.projector
            x_TP = F.linear(x_TD.float(), proj.weight.float(), None if proj.bias is None else proj.bias.float())
            if state is None or not self.pass_state:
                h_prev = x_TP.new_zeros(T, self.hidden)
                c_prev = x_TP.new_zeros(T, self.hidden) if self.cell_kind == "lstm" else None
            else:
                h_prev, c_prev = state.h_TP, state.c_TP
            if self.detach_state:
                h_prev = h_prev.detach()
                c_prev = c_prev.detach() if c_prev is not None else None
            if self.cell_kind == "lstm":
                h, c = core.cell(x_TP, (h_prev, c_prev))
            else:
                h, c = core.cell(x_TP, h_prev), None
            logits = F.linear(h, self.weight.float())
            if self.logit_residual and state is not None:
                logits = logits + self.logit_residual * state.logits_TE
        probs = logits.softmax(-1)
        ids, weights = select_topk(probs, self.top_k, self.renormalize)
        losses = {"load_balance": load_balance_loss(probs, ids, reduce=ctx.reduce_counts), "z_loss": z_loss(logits)}
        return RouterOutput(ids, weights, probs, logits, aux_losses=losses, state=RecurrentState(h, c, logits))
