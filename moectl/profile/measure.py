"""Measuring a device and a step: the model FLOPs of a training step (counted, see
docs/accounting.md), the device's peak FLOP/s that MFU is stated against (`device_peak`: a
datasheet table for known GPUs, a load-proof measurement on CPUs) and peak memory. `moectl train`
(its MFU), `moectl profile` and `moectl build` take their numbers from here."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

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


# Dense (no structured sparsity) matrix peaks from the vendors' datasheets, in TFLOP/s: the first
# entry whose pattern occurs in torch.cuda.get_device_name() wins, so specific names come first.
#   (pattern, name, bf16/fp16, tf32, fp32)
GPU_PEAKS: tuple[tuple[str, str, float, float, float], ...] = (
    ("H100 PCIe", "H100 PCIe", 756.5, 378.0, 51.2),
    ("H200", "H200", 989.4, 494.7, 66.9),
    ("GH200", "GH200", 989.4, 494.7, 66.9),
    ("H100", "H100 SXM", 989.4, 494.7, 66.9),
    ("A100", "A100", 312.0, 156.0, 19.5),
    ("L40S", "L40S", 362.1, 183.0, 91.6),
    ("L4", "L4", 121.0, 60.0, 30.3),
    ("A10", "A10", 125.0, 62.5, 31.2),
    ("MI300X", "MI300X", 1307.4, 653.7, 163.4),
)


@dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU is measured against, and where that number comes from."""

    flops: float
    source: str

    def describe(self) -> str:
        return f"{_flops_text(self.flops)} ({self.source})"


def _flops_text(flops: float) -> str:
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def gpu_table_peak(name: str, dtype: torch.dtype, tf32: bool) -> Peak | None:
    """A known GPU's datasheet peak for `dtype` (fp32 matmuls count at the TF32 rate when torch
    allows TF32), or None for a GPU the table does not know."""
    for pattern, label, half, tf32_peak, fp32 in GPU_PEAKS:
        if pattern in name:
            if dtype in (torch.bfloat16, torch.float16):
                return Peak(half * 1e12, f"{label} datasheet, dense {_dtype_name(dtype)}")
            if tf32:
                return Peak(tf32_peak * 1e12, f"{label} datasheet, dense TF32 (fp32 matmuls run as TF32)")
            return Peak(fp32 * 1e12, f"{label} datasheet, fp32")
    return None


def cpu_thread_flops(dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024), reps: int = 5) -> float:
    """FLOP/s of one thread on square matmuls, timed in that thread's CPU time: the best over
    `sizes` and `reps`. CPU time only advances while the thread runs, so other processes cannot
    shrink the result the way they shrink a wall-clock measurement (which is what let MFU pass 100%
    on a machine that was busy at start-up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = 0.0
    try:
        g = torch.Generator().manual_seed(0)
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, generator=g)
            b = torch.randn(n, n, dtype=dtype, generator=g)
            a @ b
            for _ in range(reps):
                t0 = time.thread_time()
                a @ b
                best = max(best, 2 * n ** 3 / max(time.thread_time() - t0, 1e-9))
    finally:
        torch.set_num_threads(threads)
    return best


def device_peak(device: torch.device, dtype: torch.dtype, stated_tflops: float | None = None) -> Peak:
    """The peak MFU is stated against, one per process:
    - `stated_tflops` (the recipe's train.peak_tflops) when given;
    - a GPU in `GPU_PEAKS`: its datasheet number for `dtype`;
    - a CPU: one thread's matmul rate in CPU time (`cpu_thread_flops`) times the threads torch
      uses, a bound no load at start-up can lower;
    - another GPU: the best of a few large matmuls at start-up, said to be measured."""
    if stated_tflops is not None:
        return Peak(stated_tflops * 1e12, "train.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        peak = gpu_table_peak(name, dtype, tf32)
        if peak is not None:
            return peak
        return Peak(peak_flops(device, dtype, size=4096, reps=5),
                    f"measured: best 4096² {_dtype_name(dtype)} matmul at start-up; {name} is not in moectl's "
                    "table, set train.peak_tflops to its datasheet number")
    threads = torch.get_num_threads()
    per_thread = cpu_thread_flops(dtype)
    return Peak(per_thread * threads,
                f"CPU: one thread's best {_dtype_name(dtype)} matmul in CPU time, {_flops_text(per_thread)}, "
                f"× {threads} thread{'s' if threads != 1 else ''}")


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
