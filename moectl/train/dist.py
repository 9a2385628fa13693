"""Small collective helpers that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not active():
        return t
    t = t.clone()   # out of place: the input may be needed as it was
    dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (autograd-free inputs only)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def barrier() -> None:
    if active():
        dist.barrier()
