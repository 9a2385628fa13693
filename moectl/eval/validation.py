"""Validation: the mean next-token loss over held-out sequences, and how their tokens were routed.
Training runs it at its intervals; commands that evaluate a run share it."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from moectl.core.routers.base import PLAIN, RoutingMode
from moectl.core.stats import Reduce, RoutingAccumulator
from moectl.data.loader import PackedSequences


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def evaluate(model: torch.nn.Module, seqs: PackedSequences, batches: list[list[int]], device: torch.device,
             autocast: Callable[[], AbstractContextManager] = nullcontext,
             reduce: Reduce = _no_reduce, rounds: int | None = None, *, mode: RoutingMode = PLAIN,
             on_batch: Callable[[], None] | None = None) -> tuple[float, dict[str, Any]]:
    """(mean next-token loss, routing summary with `val_tokens`, the target tokens it averaged over)
    over `batches` of sequence indices. With `reduce`
    summing over processes, each process passes its own batches and all get the global result;
    `rounds` is then the most batches any process has: every process runs that many forwards (the
    extra ones count for nothing), so a sharded model's collectives stay in step whatever the
    split. The model is evaluated in eval mode (routed as at inference) and left as it was.
    `mode` routes for evaluation (an observer, the drop-top-1 perturbation; `RoutingMode`);
    `on_batch` is called after each batch (a progress bar)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    routing = RoutingAccumulator()
    padded = [(idx, 1) for idx in batches] + [([0], 0)] * max(0, (rounds or 0) - len(batches))
    try:
        for idx, weight in padded:
            x, y = seqs.batch(idx)
            with autocast():
                out = model(x.to(device), y.to(device), mode=mode)
            total += weight * torch.stack([out.loss.double() * y.numel(),
                                           torch.tensor(float(y.numel()), device=device)])
            routing.add(out.records, weight)
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    total = reduce(total)
    loss = (total[0] / total[1]).item() if total[1] > 0 else math.nan
    return loss, {**routing.summary(reduce), "val_tokens": int(total[1].item())}
