"""Counting a model: parameters per component (total and active per token), FLOPs, memory.

Counts come from the module tree itself, so they are exact for any block or router; build the
model on the meta device to count a model of any size without allocating it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor, nn

# Training FLOPs per forward FLOP: the backward pass costs twice the forward (docs/accounting.md).
TRAIN_FLOPS_FACTOR = 3

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


def component_parameters(model: nn.Module, buffers: bool = False) -> Iterator[tuple[str, Tensor, str, float]]:
    """(name, parameter, component, active fraction) for every parameter (and with `buffers`, every
    buffer), once: tied weights are yielded under their first name. A tensor belongs to the nearest
    enclosing module that declares a `component`; `active_fraction` (k / E on expert banks) is
    inherited the same way. The one walk of the module tree that counting, optimizer groups and
    dtype casting share."""
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, component: str, fraction: float):
        component = getattr(module, "component", component)
        fraction = getattr(module, "active_fraction", fraction)
        own = list(module.named_parameters(recurse=False))
        if buffers:
            own += [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None]
        for name, t in own:
            if id(t) not in seen:
                seen.add(id(t))
                yield prefix + name, t, component, fraction
        for name, child in module.named_children():
            yield from visit(child, f"{prefix}{name}.", component, fraction)

    yield from visit(model, "", "other", 1.0)


def count_parameters(model: nn.Module) -> ParamCount:
    """Parameters per component, total and active per token (expert banks count toward the
    active total with their `active_fraction`)."""
    rows: dict[str, list[float]] = {}
    for _, p, component, fraction in component_parameters(model):
        row = rows.setdefault(component, [0, 0.0])
        row[0] += p.numel()
        row[1] += p.numel() * fraction
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
