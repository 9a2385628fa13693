"""The router contract shared by every routing method.

Shape legend used across the MoE code:
  T tokens in the flattened batch, D model width, E experts, K routed slots per token,
  F expert hidden width, N = T*K routed slots, V vocabulary.

A router maps normalised tokens x_TD to a `RouterOutput`: for each token K expert ids and their
combine weights (with a validity mask when a token uses fewer than K experts), the fp32 routing
probabilities over all experts, unweighted auxiliary losses, and the next recurrent routing state.
The MoE block never looks at the router's kind; routers register by name and are built by
`make_router`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class RouteContext:
    """Per-forward facts that some routers need. Built once by the model for all layers."""

    token_ids_T: Tensor | None = None   # input token ids (hash routing)
    step: int | None = None             # optimizer step (schedules)
    compete: frozenset[int] = frozenset()   # routed-layer indices that run a competition this forward
    shared: nn.Module | None = None     # a module shared by the routers of all layers
    # Sums per-expert slot counts over data-parallel ranks (set by the trainer), so balance losses
    # see the global batch and results do not depend on the number of processes.
    reduce_counts: Callable[[Tensor], Tensor] | None = None


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
    """Base class: holds the shared sizes; subclasses implement `forward`."""

    component = "router"
    fixed_k = False   # True when every token always gets exactly top_k experts

    def __init__(self, *, d_model: int, num_experts: int, top_k: int, index: int = 0,
                 vocab_size: int | None = None):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.index, self.vocab_size = index, vocab_size  # index: ordinal among the routed layers

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        raise NotImplementedError

    @classmethod
    def shared_module(cls, **options: Any) -> nn.Module | None:
        """A module that the routers of all layers share (built once by the model and passed in
        `RouteContext.shared`), or None. Receives d_model, num_experts and the router's options."""
        return None

    def init_weights(self, std: float, out_std: float) -> None:
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, std=std)

    def flops_per_token(self) -> int:
        """Forward FLOPs of computing the routing scores for one token."""
        return 2 * self.d_model * self.num_experts

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        """Called after each optimizer step with the expert loads of that step (slot counts)."""


def fp32_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """Router logits in fp32, also under autocast (which would otherwise run them in bf16)."""
    with torch.autocast(x_TD.device.type, enabled=False):
        return torch.nn.functional.linear(x_TD.float(), weight_ED.float())


_REGISTRY: dict[str, type[Router]] = {}


def register_router(name: str):
    def deco(cls: type[Router]) -> type[Router]:
        if name in _REGISTRY:
            raise ValueError(f"router {name!r} registered twice")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls
    return deco


def router_registry() -> dict[str, type[Router]]:
    from moectl.core import routers  # noqa: F401  (importing the package registers every router)

    return dict(_REGISTRY)


def make_router(kind: str, **kwargs: Any) -> Router:
    registry = router_registry()
    if kind not in registry:
        raise ValueError(f"unknown router kind {kind!r}; known: {', '.join(sorted(registry))}")
    return registry[kind](**kwargs)
