"""Measuring a device and a step: the model FLOPs of a training step (counted, see
docs/accounting.md), the device's peak matmul FLOP/s and peak memory (measured). `moectl train`
(its MFU), `moectl profile` and `moectl build` take their numbers from here."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moectl.core.accounting import TRAIN_FLOPS_FACTOR


def train_flops_per_token(model: nn.Module) -> float:
    """Model FLOPs of training on one token: forward + backward (twice the forward)."""
    return TRAIN_FLOPS_FACTOR * model.flops_per_token()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Wall-clock milliseconds of `reps` calls of `fn`, the device synchronised around each."""
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 10) -> float:
    """FLOP/s of one large square matmul in `dtype` on `device`, the best of `reps` (a peak is what
    the device can do; on a shared machine the median would measure the neighbours). The operands
    come from a private generator: the global random generators are left untouched."""
    n = size or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    return 2 * n ** 3 / (min(timed_ms(lambda: a @ b, device, reps)) * 1e-3)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    return statistics.median(timed_ms(fn, device, reps))


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(peak bytes, what they measure): CUDA's max allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max allocated (CUDA)"
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    except OSError:
        return None, "unknown"
