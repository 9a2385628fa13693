"""Initialisation schemes: how the papers' code bases draw the starting weights.

Modules draw the default scheme themselves (`init_weights(std, out_std)`: N(0, init_std), output
projections N(0, init_std / sqrt(2 * n_layers)) with `scale_residual_init`). A recipe can ask for
another scheme for the whole model (`model.init`), for the MoE layers' routers, experts and shared
experts (`model.moe.init`) or for the routers alone (`model.moe.router_init`); the more specific
one wins. `apply_scheme` redraws the tensors of a module tree:

  scaled_normal  the default above.
  torch_default  what PyTorch's own modules draw: Linear weights and biases U(+-1/sqrt(fan_in)),
                 Embedding N(0, 1), recurrent cells U(+-1/sqrt(hidden)); stacked experts like E
                 Linears (w1, w3: fan_in d_model; w2: fan_in expert width); a router's gate and its
                 bias like a Linear (fan_in: the gate's input width).
  sigma_moe      the sigma-MoE / MoEUT code's (CompeteSMoE 2025): router gates and every router
                 matrix N(0, fan_in^-1/2) (logits of std ~1), expert keys w1, w3 N(0, d_model^-1/2),
                 expert values w2 N(0, (E * F)^-1/2); a shared expert as one expert of its width;
                 biases zero. Defined for MoE parts only.

Norm weights stay 1 and the hash router's fixed table and the aux-loss-free biases are not
weights, in every scheme.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moectl.core.experts import ExpertBank
from moectl.core.layers import FeedForward
from moectl.core.moe import RoutedFFN
from moectl.core.routers.base import Router

SCHEMES = ("scaled_normal", "torch_default", "sigma_moe")
MOE_ONLY = ("sigma_moe",)


def _uniform(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    nn.init.uniform_(t, -bound, bound)


def _torch_default(module: nn.Module) -> None:
    if isinstance(module, ExpertBank):
        for w in (module.w1, module.w3):
            if w is not None:
                _uniform(w, module.d_model)
        _uniform(module.w2, module.hidden)
    elif isinstance(module, Router):   # a bias like its gate's (a Linear's) bias
        gate = getattr(module, "weight", None)
        bias_fan_in = gate.shape[-1] if isinstance(gate, torch.Tensor) else module.d_model
        for p in module.parameters(recurse=False):
            _uniform(p, p.shape[-1] if p.ndim > 1 else bias_fan_in)
    elif isinstance(module, (nn.Linear, nn.Embedding, nn.RNNCellBase)):
        module.reset_parameters()


def _sigma_moe(module: nn.Module) -> None:
    if isinstance(module, ExpertBank):
        for w in (module.w1, module.w3):
            if w is not None:
                nn.init.normal_(w, std=module.d_model ** -0.5)
        nn.init.normal_(module.w2, std=(module.num_experts * module.hidden) ** -0.5)
    elif isinstance(module, FeedForward):   # a shared expert: one expert of its width
        for lin in (module.w1, module.w3):
            if lin is not None:
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        nn.init.normal_(module.w2.weight, std=module.w2.in_features ** -0.5)
    elif isinstance(module, (Router, nn.Linear, nn.RNNCellBase)):   # every router matrix N(0, 1/fan_in)
        for p in module.parameters(recurse=False):
            if p.ndim > 1:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
            else:
                nn.init.zeros_(p)


@torch.no_grad()
def apply_scheme(root: nn.Module, scheme: str, std: float, out_std: float) -> None:
    """Redraw every weight under `root` (not the norms, not fixed tables) with `scheme`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown initialisation scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    # A head tied to the embedding is drawn as the embedding (not again as a Linear).
    embedded = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
    for module in root.modules():   # each module draws its own parameters (recurse=False)
        if isinstance(module, nn.Linear) and id(module.weight) in embedded:
            continue
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif scheme == "scaled_normal":
            if hasattr(module, "init_weights") and not _is_model(module):
                module.init_weights(std, out_std)
        elif scheme == "torch_default":
            _torch_default(module)
        else:
            _sigma_moe(module)


def _is_model(module: nn.Module) -> bool:
    return hasattr(module, "routed_layers")


def moe_parts(model: nn.Module, routers_only: bool = False) -> list[nn.Module]:
    """The subtrees a MoE-level scheme covers: every routed layer's router (and the routers' shared
    module), and unless `routers_only` its experts, shared experts and shared gate."""
    parts: list[nn.Module] = []
    for layer in model.modules():
        if isinstance(layer, RoutedFFN):
            parts.append(layer.router)
            if not routers_only:
                parts.append(layer.experts)
                parts += [m for m in (layer.shared, layer.shared_gate) if m is not None]
    shared = getattr(model, "router_shared", None)
    if shared is not None:
        parts.append(shared)
    return parts


def describe(model_scheme: str, moe_scheme: str | None, router_scheme: str | None, std: float,
             scale_residual: bool) -> str:
    """One line for `moectl build`: which scheme draws which weights."""
    base = {"scaled_normal": f"scaled_normal (N(0, {std:g})" + (", output projections / sqrt(2 L))"
                                                                 if scale_residual else ")"),
            "torch_default": "torch_default (PyTorch's module defaults)"}[model_scheme]
    parts = [f"init: {base}"]
    if moe_scheme and moe_scheme != model_scheme:
        parts.append(f"MoE routers, experts and shared experts: {moe_scheme}")
    if router_scheme and router_scheme != (moe_scheme or model_scheme):
        parts.append(f"routers: {router_scheme}")
    return "; ".join(parts)
