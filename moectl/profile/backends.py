"""The expert backends side by side, on a model's MoE layer shape: dispatch + experts + combine,
forward and backward, on jagged routing (expert loads drawn from a skewed distribution) and on
forced-uniform routing (every expert exactly T*K/E slots)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from moectl.core.accounting import TRAIN_FLOPS_FACTOR
from moectl.core.experts import (
    BACKEND_NAMES,
    ExpertBank,
    grouped_mm_available,
    run_experts,
    triton_usable,
)
from moectl.core.moe import RoutedFFN
from moectl.profile.measure import median_ms


@dataclass
class BackendRow:
    backend: str
    routing: str                 # "jagged" | "uniform"
    ms: float | None             # forward + backward, median
    tflops: float | None
    rel_diff: float | None       # output against the loop's, relative
    note: str = ""


# --------------------------------------------------------------------------- expert backends


def _uniform_ids(T: int, K: int, E: int, device: torch.device) -> torch.Tensor:
    """Every expert exactly T*K/E slots (round robin; a token's K experts are distinct when K <= E)."""
    base = torch.arange(T, device=device).unsqueeze(1) * K + torch.arange(K, device=device)
    return base % E


def _jagged_ids(T: int, K: int, E: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """K distinct experts per token, drawn with probability proportional to 1 / (rank + 1): a few
    experts take far more than their share and some very little, as early in training."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    weights = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
    ids = torch.multinomial(weights.expand(T, E), K, replacement=False, generator=g)
    return ids.to(device)


def compare_backends(model: nn.Module, tokens: int, device: torch.device, dtype: torch.dtype,
                     reps: int, warmup: int) -> tuple[dict[str, int], list[BackendRow]]:
    """Dispatch + experts + combine, forward and backward, for every backend that runs here."""
    layer = next((m for m in model.modules() if isinstance(m, RoutedFFN)), None)
    if layer is None:
        return {}, []
    src = layer.experts
    E, K, D, Fh = src.num_experts, layer.top_k, src.d_model, src.hidden
    shape = {"tokens": tokens, "d_model": D, "expert_hidden": Fh, "experts": E, "top_k": K}
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, D, generator=g).to(device=device, dtype=dtype)
    w = torch.rand(tokens, K, generator=g).to(device)
    w = w / w.sum(-1, keepdim=True)
    rows: list[BackendRow] = []
    flops = TRAIN_FLOPS_FACTOR * tokens * K * src.flops_per_slot()
    routings = (("jagged", _jagged_ids(tokens, K, E, device)), ("uniform", _uniform_ids(tokens, K, E, device)))
    for routing, ids in routings:
        ref = None
        for name in BACKEND_NAMES[1:]:
            if name == "triton" and triton_usable(device) is not None:
                rows.append(BackendRow(name, routing, None, None, None, "needs CUDA and triton"))
                continue
            if name == "triton" and device.type != "cuda":
                rows.append(BackendRow(name, routing, None, None, None, "interpreter on CPU: not timed"))
                continue
            bank = ExpertBank(E, D, Fh, src.activation, name).to(device=device, dtype=dtype)
            with torch.no_grad():
                for a, b in ((bank.w1, src.w1), (bank.w2, src.w2), (bank.w3, src.w3)):
                    if a is not None:
                        a.copy_(b)
            xi = x.clone().requires_grad_(True)

            def once(bank=bank, xi=xi, ids=ids) -> torch.Tensor:
                y, _ = run_experts(bank, xi, ids, w, None)
                y.float().square().mean().backward()
                xi.grad = None
                for p in bank.parameters():
                    p.grad = None
                return y

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(warmup):
                    once()
                ms = median_ms(once, device, reps)
                with torch.no_grad():
                    y = run_experts(bank, x, ids, w, None)[0].float()
            if ref is None:
                ref = y
            rel = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            note = ""
            if name == "grouped_mm" and not grouped_mm_available(x, bank.w1, bank.w2):
                note = "cannot run here: this is the loop"
            rows.append(BackendRow(name, routing, ms, flops / (ms * 1e-3) / 1e12, rel, note))
    return shape, rows
