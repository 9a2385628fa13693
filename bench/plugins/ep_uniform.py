"""A benchmark-only router plugin (`plugins: [ep_uniform]` with bench/plugins on PYTHONPATH):
`model.moe.router.kind: uniform` sends token t of a batch to experts (t*K + j) mod E, j < K, with
equal weights, so every expert gets the same number of rows: expert parallelism's best case, next
to a learned router's real loads (bench/ep_check.sh). Nothing in it is learned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moectl.core.routers.base import RouteContext, Router, RouterOutput, register_router


@dataclass
class UniformOptions:
    """Round-robin routing with exactly equal loads; for benchmarks."""


@register_router("uniform", options=UniformOptions)
class UniformRouter(Router):
    balance_loss = False
    fixed_k = True
    learned = False
    drop_top1_refusal = None

    def flops_per_token(self) -> int:
        return 0

    def forward(self, x_TD: Tensor, ctx: RouteContext, state: Any = None) -> RouterOutput:
        T, K, E = x_TD.shape[0], self.top_k, self.num_experts
        slot = torch.arange(T * K, device=x_TD.device).view(T, K)
        ids = slot % E
        weights = torch.full((T, K), 1.0 / K, device=x_TD.device)
        probs = torch.full((T, E), 1.0 / E, device=x_TD.device)
        return RouterOutput(ids, weights, probs, None, state=state)
