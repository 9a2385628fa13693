"""What `moectl profile` measures: where a training step's time goes, stage by stage.

A step of the recipe's model (forward, backward, AdamW) runs under torch.profiler with the
engine's stage labels on (`moectl.core.stages`). Forward time of a stage is the time inside its
labels; backward time is that of the autograd nodes whose forward ran inside them (autograd gives
each node the sequence number of the forward op that made it, and the profiler records both).
FLOP/s per stage come from the model's own FLOP counts (the convention of docs/accounting.md:
backward = 2 x forward), against the peak of one large matmul in the same dtype on the same
device. Kernel shares sort every leaf op by what it is: matmul, attention, the loss's softmax
work, or something else.

The expert backends are compared apart, on the recipe's MoE layer shape: dispatch + experts +
combine forward and backward, on jagged routing (expert loads drawn from a skewed distribution)
and on forced-uniform routing (every expert exactly T*K/E slots).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moectl.core.stages import PREFIX, STAGES, profiling_stages

MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::addbmm", "aten::baddbmm",
              "aten::_grouped_mm", "aten::linear", "aten::matmul", "aten::mkldnn_linear", "aten::_mkl_linear"}
ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "_cudnn_attention")
LOSS_OPS = {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
            "aten::nll_loss_backward", "aten::logsumexp"}
KERNEL_CLASSES = ("matmul", "attention", "loss", "other")


@dataclass
class StageRow:
    stage: str
    forward_ms: float
    backward_ms: float
    flops: float | None          # model FLOPs of forward + backward in one step (None: not matmul work)

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms


@dataclass
class BackendRow:
    backend: str
    routing: str                 # "jagged" | "uniform"
    ms: float | None             # forward + backward, median
    tflops: float | None
    rel_diff: float | None       # output against the loop's, relative
    note: str = ""


@dataclass
class Profile:
    device: str
    dtype: str
    torch_version: str
    tokens_per_step: int
    step_ms: float               # median of the unprofiled timed steps
    profiled_step_ms: float      # the step under the profiler (its overhead included)
    peak_tflops: float
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
        """Model FLOPs utilisation: model FLOPs per step / step time / the measured matmul peak."""
        return self.model_flops_per_step / (self.step_ms * 1e-3) / (self.peak_tflops * 1e12)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mfu"] = self.mfu
        for key in ("model_stages", "block_stages"):
            for row, obj in zip(out[key], getattr(self, key), strict=True):
                row["total_ms"] = obj.total_ms
                row["tflops_per_s"] = _rate(obj.flops, obj.total_ms)
        return out


def _rate(flops: float | None, ms: float) -> float | None:
    return None if flops is None or ms <= 0 else flops / (ms * 1e-3) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 10) -> float:
    """TFLOP/s of one large square matmul in `dtype` on `device`: the best of `reps` (a peak is what
    the device can do; on a shared machine the median would measure the neighbours)."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e12


# --------------------------------------------------------------------------- stage attribution


def _event_ms(e, device: torch.device) -> float:
    us = e.device_time_total if device.type == "cuda" else e.cpu_time_total
    return us / 1e3


def _stage_of(e) -> str | None:
    """The innermost moectl stage label around an event (None: outside every label)."""
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(PREFIX):
            return p.name[len(PREFIX):]
        p = p.cpu_parent
    return None


def _inside_kernel_class(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name in MATMUL_OPS or any(w in p.name for w in ATTENTION_WORDS):
            return True
        p = p.cpu_parent
    return False


def _kernel_class(name: str, stage: str | None) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if any(w in name for w in ATTENTION_WORDS):
        return "attention"
    if name in LOSS_OPS or stage == "head_loss":
        return "loss"
    return "other"


def attribute(events, device: torch.device, steps: int) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """Per stage [forward ms, backward ms] per step, the share of each kernel class, and the
    profiled step time, from a profiler's events."""
    from torch.autograd import DeviceType

    times: dict[str, list[float]] = {}
    seq_stage: dict[tuple[int, int], str] = {}
    # The CPU-side ops only: on CUDA the kernels (and GPU copies of the labels) are separate
    # events, whose time the ops' device_time_total already holds.
    events = [e for e in events if e.device_type == DeviceType.CPU]
    for e in events:   # forward ops: which label they ran in
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            stage = _stage_of(e)
            if stage is not None:
                seq_stage.setdefault((e.thread, e.sequence_nr), stage)
    steps_total = 0.0
    for e in events:
        if e.name.startswith(PREFIX):
            parent = _stage_of(e)
            if parent is None:   # the outermost label of a range counts; nested ones are inside it
                times.setdefault(e.name[len(PREFIX):], [0.0, 0.0])[0] += _event_ms(e, device)
        elif e.name == "moectl.profile.step":
            steps_total += _event_ms(e, device)
        elif e.name.startswith("autograd::engine::evaluate_function:"):
            stage = seq_stage.get((e.fwd_thread, e.sequence_nr)) if e.sequence_nr >= 0 else None
            if stage is None and "AccumulateGrad" in e.name:
                stage = "grad_accum"
            times.setdefault(stage or "other", [0.0, 0.0])[1] += _event_ms(e, device)
    # Kernel classes: a matmul or attention op counts whole (its inner calls are part of it);
    # everything else counts its own time, as loss work inside head + loss, else as other.
    share = dict.fromkeys(KERNEL_CLASSES, 0.0)
    cuda = device.type == "cuda"
    for e in events:
        if e.name.startswith(PREFIX) or e.name == "moectl.profile.step" or _inside_kernel_class(e):
            continue
        stage = _stage_of(e)
        if stage is None:   # a backward node's ops: the stage of the node's forward
            node = e.cpu_parent
            while node is not None and not node.name.startswith("autograd::engine::evaluate_function:"):
                node = node.cpu_parent
            if node is not None and node.sequence_nr >= 0:
                stage = seq_stage.get((node.fwd_thread, node.sequence_nr))
        kind = _kernel_class(e.name, stage)
        if kind in ("matmul", "attention"):
            share[kind] += e.device_time_total if cuda else e.cpu_time_total
        else:
            share[kind] += e.self_device_time_total if cuda else e.self_cpu_time_total
    total = sum(share.values()) or 1.0
    share = {k: v / total for k, v in share.items()}
    per_step = {k: [v[0] / steps, v[1] / steps] for k, v in times.items()}
    return per_step, share, steps_total / steps


# --------------------------------------------------------------------------- FLOPs per stage


def stage_flops(model: nn.Module, tokens: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs (forward + backward) of one step per stage."""
    from moectl.core.moe import RoutedFFN

    f: dict[str, float] = {}

    def add(stage: str, fwd: float) -> None:
        f[stage] = f.get(stage, 0.0) + 3 * fwd * tokens

    for block in model.layers:
        add("attention", block.attn.flops_per_token(seq_len))
        ffn = getattr(block.mlp, "ffn", None)
        if ffn is not None:
            add("dense_ffn", ffn.flops_per_token())
    for layer in model.modules():
        if isinstance(layer, RoutedFFN):
            add("router", layer.router.flops_per_token())
            add("experts", layer.top_k * layer.experts.flops_per_slot())
            if layer.shared is not None:
                add("shared_experts", layer.shared.flops_per_token())
    add("head_loss", 2 * model.args.d_model * model.args.vocab_size)
    return f


def stage_rows(per_step: dict[str, list[float]], flops: dict[str, float]) -> list[StageRow]:
    order = [*STAGES, "grad_accum", "other"]
    names = sorted(per_step, key=lambda s: order.index(s) if s in order else len(order))
    return [StageRow(s, per_step[s][0], per_step[s][1], flops.get(s)) for s in names]


# --------------------------------------------------------------------------- the step


@dataclass
class StepSetup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor
    targets: torch.Tensor
    device: torch.device
    bf16: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def step(self) -> None:
        with self.autocast():
            out = self.model(self.tokens, self.targets, step=0)
        out.total_loss.backward()
        with _stage("optimizer"):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _stage(name: str):
    from moectl.core.stages import record_stage

    return record_stage(name)


def _timed(fn, device: torch.device, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def profile_steps(setup: StepSetup, steps: int, warmup: int, trace: Path | None = None):
    """Time `steps` unprofiled steps (after `warmup`), then profile `steps` more."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(warmup):
        setup.step()
    plain = statistics.median(_timed(setup.step, setup.device, steps))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with quiet_native_stderr(), profiling_stages(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("moectl.profile.step"):
                setup.step()
            sync(setup.device)
        profiled = (time.perf_counter() - t0) * 1e3 / steps   # wall clock: the backward's own thread included
    if trace is not None:
        export_trace(prof, trace)
    return plain, profiled, prof.events()


def export_trace(prof, path: Path) -> None:
    """The Chrome trace, written next to its place and moved in (the profiler only logs a failed
    write, so the file's presence is checked)."""
    from moectl.errors import MoectlError
    from moectl.fsutil import temp_tag

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
    from moectl.core.model import MoEBlock
    from moectl.core.routers.base import RouteContext

    block = next((m for m in model.modules() if isinstance(m, MoEBlock)), None)
    if block is None:
        return "", []
    name = next(n for n, m in model.named_modules() if m is block)
    d = model.args.d_model
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, tokens, d, generator=g).to(device).requires_grad_(True)
    ctx = RouteContext(shared=model.router_shared, token_ids_T=torch.zeros(tokens, dtype=torch.long, device=device))

    def once() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y, _, recs = block(h, ctx, None)
            loss = y.float().square().mean() + sum(r.loss for r in recs)
        loss.backward()
        h.grad = None
        for p in block.parameters():
            p.grad = None

    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(warmup):
        once()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_native_stderr(), profiling_stages(), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("moectl.profile.step"):
                once()
            sync(device)
    per_step, _, _ = attribute(prof.events(), device, steps)
    flops = stage_flops(model, tokens, model.args.seq_len)
    n_blocks = sum(1 for m in model.modules() if isinstance(m, MoEBlock))
    per_block = {k: v / n_blocks for k, v in flops.items() if k in ("router", "experts", "shared_experts")}
    return name, stage_rows(per_step, per_block)


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
    from moectl.core.experts import (
        BACKEND_NAMES,
        ExpertBank,
        grouped_mm_available,
        run_experts,
        triton_usable,
    )
    from moectl.core.moe import RoutedFFN

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
    flops = 3 * tokens * K * src.flops_per_slot()
    for routing, ids in (("jagged", _jagged_ids(tokens, K, E, device)), ("uniform", _uniform_ids(tokens, K, E, device))):
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

            with warn_once_quiet():
                for _ in range(warmup):
                    once()
                ms = statistics.median(_timed(once, device, reps))
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


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence what the profiler's native library prints on file descriptor 2 as it starts and
    stops (Python exceptions still propagate; they are printed after the block)."""
    import os
    import sys

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


@contextlib.contextmanager
def warn_once_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- all of it


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "max allocated (CUDA)"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    except (ImportError, OSError):
        return None, "unknown"


def run_profile(model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, device: torch.device,
                bf16: bool, steps: int = 3, warmup: int = 2, trace: Path | None = None,
                backends: bool = True, seed: int = 0) -> Profile:
    args = model.args
    g = torch.Generator(device="cpu").manual_seed(seed)
    seq = args.seq_len
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq + 1), generator=g).to(device)
    setup = StepSetup(model.train(), optimizer, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), device, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The steps train (AdamW on random tokens); the block and backend tables and the caller get the
    # weights as they were.
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain_ms, profiled_ms, events = profile_steps(setup, steps, warmup, trace)
    per_step, share, _ = attribute(events, device, steps)
    model.load_state_dict(saved)
    del saved
    T = batch_size * seq
    rows = stage_rows(per_step, stage_flops(model, T, seq))
    mem, mem_kind = peak_memory(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    block_name, block_rows = block_profile(model, T, device, bf16, steps, 1)
    prof = Profile(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        dtype="bf16 autocast" if bf16 else "fp32", torch_version=torch.__version__, tokens_per_step=T,
        step_ms=plain_ms, profiled_step_ms=profiled_ms, peak_tflops=measure_peak(device, dtype),
        peak_memory_mb=mem, memory_kind=mem_kind, model_stages=rows, block_stages=block_rows,
        block_name=block_name, kernel_share=share, trace=str(trace) if trace else None,
        model_flops_per_step=3.0 * model.flops_per_token() * T)
    if backends:
        prof.backend_shape, prof.backends = compare_backends(model, T, device, dtype, max(steps, 3), 1)
    return prof


def write_json(profile: Profile, path: Path) -> None:
    from moectl.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(_finite(profile.to_dict()), indent=2, allow_nan=False))


def _finite(v: Any) -> Any:
    """Non-finite numbers as null (JSON has no NaN), recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v
