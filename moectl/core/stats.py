"""Routing statistics over `RoutingRecord`s: what training logs, validation and `moectl eval`
report about how tokens were routed (per-layer loads, balance, entropy, dropping)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from moectl.core.accounting import TRAIN_FLOPS_FACTOR
from moectl.core.moe import RoutingRecord

Reduce = Callable[[torch.Tensor], torch.Tensor]   # sums a tensor over data-parallel processes


def layer_summary(load_E: torch.Tensor, dropped: float, slots: float, entropy: float, tokens: int,
                  topk_mass: float = math.nan) -> dict[str, Any]:
    """Balance measures of one routed layer from its slot counts (docs/eval.md defines them)."""
    load = load_E.double()
    mean = load.mean().item()
    share = load / load.sum() if mean > 0 else load
    load_entropy = -(share * share.clamp_min(1e-30).log()).sum().item()
    return {
        "load": [int(x) for x in load.tolist()],
        "imbalance": load.max().item() / mean if mean > 0 else math.nan,
        "cv": load.std(unbiased=False).item() / mean if mean > 0 else math.nan,
        "dead": int((load < 0.01 * mean).sum().item()),
        "diversity": math.exp(load_entropy) / len(load) if mean > 0 else math.nan,
        "entropy": entropy,
        "topk_mass": topk_mass,
        "dropped_frac": dropped / slots if slots else 0.0,
        "experts_per_token": load.sum().item() / tokens if tokens else 0.0,
    }


class RoutingAccumulator:
    """Sums routing records over forwards (micro-batches, batches) and, through `reduce`, over
    processes. `summary` gives per-layer measures, mean unweighted losses, the layer kinds' counters
    and the extra FLOPs per token some layers spend beyond top-k routing."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.names: list[str] = []
        self.load: list[torch.Tensor] = []
        self.scalars: list[torch.Tensor] = []   # per layer: [dropped, slots, entropy*tokens, tokens, mass*tokens]
        self.losses: dict[str, torch.Tensor] = {}
        self.counters: dict[str, float] = {}
        self.count = 0
        self.extra_flops = 0
        self.tokens = 0

    def add(self, records: list[RoutingRecord], weight: int = 1) -> None:
        """Add one forward's records. `weight=0` adds nothing but makes the accumulator hold the
        same layers and keys as the other processes' (a process that ran a padding forward)."""
        if not self.names:
            self.names = [r.name for r in records]
            self.load = [torch.zeros_like(r.load_E) for r in records]
            self.scalars = [torch.zeros(5, device=r.load_E.device) for r in records]
        for i, r in enumerate(records):
            for k, v in r.counters.items():
                self.counters[k] = self.counters.get(k, 0) + weight * v
            self.extra_flops += weight * r.extra_flops
            self.load[i] += weight * r.load_E
            mass = r.topk_mass if r.topk_mass is not None else torch.full((), math.nan, device=r.load_E.device)
            self.scalars[i] += weight * torch.stack([r.dropped, r.slots, r.entropy * r.tokens,
                                                     torch.tensor(float(r.tokens), device=r.load_E.device),
                                                     mass.float() * r.tokens])
            for k, v in r.losses.items():
                self.losses[k] = self.losses.get(k, torch.zeros((), device=v.device)) + weight * v / len(records)
        self.count += weight
        self.tokens += weight * records[0].tokens if records else 0

    def summary(self, reduce: Reduce) -> dict[str, Any]:
        """Per-layer measures and mean unweighted losses; `reduce` sums a tensor over processes.
        A collective when `reduce` is: every process calls it, with the same layers and counters."""
        if not self.names:
            return {}
        loads = reduce(torch.stack(self.load))
        scalars = reduce(torch.stack(self.scalars)).tolist()
        layers = {}
        for name, load, (dropped, slots, ent_tok, tokens, mass_tok) in zip(self.names, loads, scalars, strict=True):
            layers[name] = layer_summary(load, dropped, slots, ent_tok / max(tokens, 1), int(tokens),
                                         mass_tok / max(tokens, 1))
        out: dict[str, Any] = {"layers": layers}
        world = reduce(torch.ones((), device=loads.device)).item()
        count = reduce(torch.tensor(float(self.count), device=loads.device)).item()
        for k, v in self.losses.items():
            out[k] = reduce(v).item() / max(count, 1)
        out["imbalance_max"] = max(v["imbalance"] for v in layers.values())
        out["diversity_min"] = min(v["diversity"] for v in layers.values())
        out["dead_max"] = max(v["dead"] for v in layers.values())
        names = sorted(self.counters)
        counted = [float(self.extra_flops), float(self.tokens), *(float(self.counters[k]) for k in names)]
        totals = reduce(torch.tensor(counted,
                                     dtype=torch.float64, device=loads.device)).tolist()
        counts = {k: v / world for k, v in zip(names, totals[2:], strict=True)}   # events per process
        shares = {k: k.split("/", 1) for k in names if "/" in k}
        denominators = {den for _, den in shares.values()}
        for k, v in counts.items():
            if k in shares:        # "name/den": reported as name = its sum / the sum of counter den
                name, den = shares[k]
                if counts.get(den):
                    out[name] = v / counts[den]
            elif k not in denominators:
                out[k] = v
        if totals[0]:
            # Extra work (forward + backward) per training token, reported apart from model FLOPs and MFU.
            out["extra_flops_per_token"] = TRAIN_FLOPS_FACTOR * totals[0] / max(totals[1], 1)
        return out
