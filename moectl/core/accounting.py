"""Counting a model: parameters per component (total and active per token), FLOPs, memory.

Counts come from the module tree itself, so they are exact for any block or router; build the
model on the meta device to count a model of any size without allocating it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

COMPONENT_ORDER = ("embedding", "attention", "norm", "dense_ffn", "router", "experts",
                   "shared_experts", "lm_head", "other")


@dataclass
class ParamCount:
    rows: dict[str, tuple[int, float]] = field(default_factory=dict)   # component -> (total, active)

    @property
    def total(self) -> int:
        return sum(t for t, _ in self.rows.values())

    @property
    def active(self) -> float:
        return sum(a for _, a in self.rows.values())

    @property
    def embedding(self) -> int:
        return self.rows.get("embedding", (0, 0.0))[0]


def count_parameters(model: nn.Module) -> ParamCount:
    """Attribute every parameter to the nearest enclosing module that declares a `component`;
    expert banks count toward the active total with their `active_fraction` (k / E)."""
    rows: dict[str, list[float]] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, component: str, fraction: float) -> None:
        component = getattr(module, "component", component)
        fraction = getattr(module, "active_fraction", fraction)
        for p in module.parameters(recurse=False):
            if id(p) in seen:        # tied weights count once
                continue
            seen.add(id(p))
            row = rows.setdefault(component, [0, 0.0])
            row[0] += p.numel()
            row[1] += p.numel() * fraction
        for child in module.children():
            visit(child, component, fraction)

    visit(model, "other", 1.0)
    order = {c: i for i, c in enumerate(COMPONENT_ORDER)}
    ordered = sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order)))
    return ParamCount({k: (int(v[0]), v[1]) for k, v in ordered})


@dataclass
class MemoryPlan:
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def training_memory(n_params: int, weight_bytes: int = 4, grad_bytes: int = 4,
                    optimizer_states: int = 2, state_bytes: int = 4) -> MemoryPlan:
    """Bytes for weights, gradients and AdamW state (two fp32 moments). Mixed precision with
    autocast keeps fp32 master weights and gradients, so the defaults hold for bf16 runs too.
    Activations are not included: they depend on batch size and checkpointing."""
    return MemoryPlan(n_params * weight_bytes, n_params * grad_bytes,
                      n_params * optimizer_states * state_bytes)
