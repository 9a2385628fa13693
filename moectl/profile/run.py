"""What `moectl profile` measures: where a training step's time goes, stage by stage.

A step of the recipe's model (forward, backward, AdamW) runs under torch.profiler with the
engine's stage labels on (`moectl.core.stages`); `attribution` turns the events into stage times,
FLOP/s against the peak of one large matmul in the same dtype on the same device (`measure`) and
kernel shares. The first MoE block is profiled alone, and the expert backends are compared apart
(`backends`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from moectl.core.model import MoEBlock
from moectl.core.routers.base import RouteContext
from moectl.core.stages import profiling_stages
from moectl.errors import MoectlError
from moectl.fsutil import temp_tag, write_json
from moectl.profile import measure
from moectl.profile.attribution import StageRow, attribute, stage_flops, stage_rows, tflops_per_s
from moectl.profile.backends import BackendRow, compare_backends
from moectl.train.step import TrainStep


@dataclass
class Profile:
    device: str
    dtype: str
    torch_version: str
    tokens_per_step: int
    step_ms: float               # median of the unprofiled timed steps
    profiled_step_ms: float      # the step under the profiler (its overhead included)
    peak_tflops: float
    peak_source: str
    peak_memory_mb: float | None
    memory_kind: str
    model_stages: list[StageRow]
    block_stages: list[StageRow]
    block_name: str
    kernel_share: dict[str, float]
    model_flops_per_step: float = 0.0   # 3 x forward FLOPs per token x tokens (docs/accounting.md)
    backends: list[BackendRow] = field(default_factory=list)
    backend_shape: dict[str, int] = field(default_factory=dict)
    trace: str | None = None

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: model FLOPs per step / step time / the stated peak (`peak_source`)."""
        return self.model_flops_per_step / (self.step_ms * 1e-3) / (self.peak_tflops * 1e12)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mfu"] = self.mfu
        for key in ("model_stages", "block_stages"):
            for row, obj in zip(out[key], getattr(self, key), strict=True):
                row["total_ms"] = obj.total_ms
                row["tflops_per_s"] = tflops_per_s(obj.flops, obj.total_ms)
        return out


# --------------------------------------------------------------------------- the step


def profile_steps(one_step: Callable[[], object], device: torch.device, steps: int, warmup: int,
                  trace: Path | None = None):
    """Time `steps` unprofiled steps (after `warmup`), then profile `steps` more."""
    for _ in range(warmup):
        one_step()
    plain = measure.median_ms(one_step, device, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_native_stderr(), profiling_stages(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("moectl.profile.step"):
                one_step()
            measure.sync(device)
        profiled = (time.perf_counter() - t0) * 1e3 / steps   # wall clock: the backward's own thread included
    if trace is not None:
        export_trace(prof, trace)
    return plain, profiled, prof.events()


def export_trace(prof, path: Path) -> None:
    """The Chrome trace, written next to its place and moved in (the profiler only logs a failed
    write, so the file's presence is checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{temp_tag()}")
    with quiet_native_stderr():
        prof.export_chrome_trace(str(tmp))
    if not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        raise MoectlError(f"--trace {path}: the trace could not be written there",
                          hint="check the folder's space and permissions, or choose another place")
    tmp.replace(path)


# --------------------------------------------------------------------------- the MoE block alone


def block_profile(model: nn.Module, tokens: int, device: torch.device, bf16: bool, steps: int,
                  warmup: int) -> tuple[str, list[StageRow]]:
    """The first MoE block of the model on its own: forward + backward of random normalised tokens."""
    block = next((m for m in model.modules() if isinstance(m, MoEBlock)), None)
    if block is None:
        return "", []
    name = next(n for n, m in model.named_modules() if m is block)
    d = model.args.d_model
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, tokens, d, generator=g).to(device).requires_grad_(True)
    ctx = RouteContext(shared=model.router_shared, token_ids_T=torch.zeros(tokens, dtype=torch.long, device=device),
                       balance=model.balance, seq_len=tokens)

    def once() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y, _, recs = block(h, ctx, None)
            loss = y.float().square().mean() + sum(r.loss for r in recs)
        loss.backward()
        h.grad = None
        for p in block.parameters():
            p.grad = None

    for _ in range(warmup):
        once()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_native_stderr(), profiling_stages(), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("moectl.profile.step"):
                once()
            measure.sync(device)
    per_step, _, _ = attribute(prof.events(), device, steps)
    flops = stage_flops(model, tokens, model.args.seq_len)
    n_blocks = sum(1 for m in model.modules() if isinstance(m, MoEBlock))
    per_block = {k: v / n_blocks for k, v in flops.items() if k in ("router", "experts", "shared_experts")}
    return name, stage_rows(per_step, per_block)


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence what the profiler's native library prints on file descriptor 2 as it starts and
    stops (Python exceptions still propagate; they are printed after the block)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_profile(model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, device: torch.device,
                bf16: bool, steps: int = 3, warmup: int = 2, trace: Path | None = None,
                backends: bool = True, seed: int = 0, grad_clip: float = 1.0,
                peak_tflops: float | None = None) -> Profile:
    """Profile training steps of `model` (the trainer's own step, `TrainStep`, on random tokens of
    `batch_size` sequences), its first MoE block alone and, with `backends`, the expert backends."""
    args = model.args
    g = torch.Generator(device="cpu").manual_seed(seed)
    seq = args.seq_len
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq + 1), generator=g).to(device)
    batch = [(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())]
    train_step = TrainStep(model.train(), model, optimizer, device=device, bf16=bf16, grad_clip=grad_clip)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The steps train (AdamW on random tokens); the block and backend tables and the caller get the
    # weights as they were.
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain_ms, profiled_ms, events = profile_steps(lambda: train_step(batch, 0), device, steps, warmup, trace)
    per_step, share, _ = attribute(events, device, steps)
    model.load_state_dict(saved)
    del saved
    T = batch_size * seq
    rows = stage_rows(per_step, stage_flops(model, T, seq))
    mem, mem_kind = measure.peak_memory(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = measure.device_peak(device, dtype, peak_tflops)
    block_name, block_rows = block_profile(model, T, device, bf16, steps, 1)
    prof = Profile(
        device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({torch.get_num_threads()} threads)"),
        dtype="bf16 autocast" if bf16 else "fp32", torch_version=torch.__version__, tokens_per_step=T,
        step_ms=plain_ms, profiled_step_ms=profiled_ms, peak_tflops=peak.flops / 1e12, peak_source=peak.source,
        peak_memory_mb=mem / 2**20 if mem is not None else None, memory_kind=mem_kind, model_stages=rows,
        block_stages=block_rows,
        block_name=block_name, kernel_share=share, trace=str(trace) if trace else None,
        model_flops_per_step=measure.train_flops_per_token(model) * T)
    if backends:
        prof.backend_shape, prof.backends = compare_backends(model, T, device, dtype, max(steps, 3), 1)
    return prof


def write_profile(profile: Profile, path: Path) -> None:
    """Every number as JSON (non-finite numbers as null), written atomically."""
    write_json(path, profile.to_dict())
