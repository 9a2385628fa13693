"""What a run measures and where it goes: per-layer routing statistics, metrics.jsonl,
TensorBoard, the progress bar and the final summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from moectl.core.moe import RoutingRecord
from moectl.errors import MoectlError
from moectl.fsutil import atomic_write_text


def layer_summary(load_E: torch.Tensor, dropped: float, slots: float, entropy: float, tokens: int) -> dict[str, Any]:
    """Balance measures of one routed layer from its slot counts."""
    load = load_E.double()
    mean = load.mean().item()
    return {
        "load": [int(x) for x in load.tolist()],
        "imbalance": load.max().item() / mean if mean > 0 else math.nan,
        "cv": load.std(unbiased=False).item() / mean if mean > 0 else math.nan,
        "dead": int((load < 0.01 * mean).sum().item()),
        "entropy": entropy,
        "dropped_frac": dropped / slots if slots else 0.0,
        "experts_per_token": load.sum().item() / tokens if tokens else 0.0,
    }


class RoutingAccumulator:
    """Sums routing records over micro-batches (and, via `reduce`, over processes)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.names: list[str] = []
        self.load: list[torch.Tensor] = []
        self.scalars: list[torch.Tensor] = []   # per layer: [dropped, slots, entropy*tokens, tokens]
        self.losses: dict[str, torch.Tensor] = {}
        self.count = 0
        self.competitions = 0      # (layer, micro-batch) pairs that ran a competition
        self.extra_flops = 0       # their forward FLOPs beyond top-k routing
        self.tokens = 0

    def add(self, records: list[RoutingRecord]) -> None:
        if not self.names:
            self.names = [r.name for r in records]
            self.load = [torch.zeros_like(r.load_E) for r in records]
            self.scalars = [torch.zeros(4, device=r.load_E.device) for r in records]
        for i, r in enumerate(records):
            self.competitions += int(r.competed)
            self.extra_flops += r.extra_flops
            self.load[i] += r.load_E
            self.scalars[i] += torch.stack([r.dropped, r.slots, r.entropy * r.tokens,
                                            torch.tensor(float(r.tokens), device=r.load_E.device)])
            for k, v in r.losses.items():
                self.losses[k] = self.losses.get(k, torch.zeros((), device=v.device)) + v / len(records)
        self.count += 1
        self.tokens += records[0].tokens if records else 0

    def summary(self, reduce) -> dict[str, Any]:
        """Per-layer measures and mean unweighted losses; `reduce` sums a tensor over processes."""
        if not self.names:
            return {}
        loads = reduce(torch.stack(self.load))
        scalars = reduce(torch.stack(self.scalars)).tolist()
        layers = {}
        for name, load, (dropped, slots, ent_tok, tokens) in zip(self.names, loads, scalars, strict=True):
            layers[name] = layer_summary(load, dropped, slots, ent_tok / max(tokens, 1), int(tokens))
        out: dict[str, Any] = {"layers": layers}
        world = reduce(torch.ones((), device=loads.device)).item()
        for k, v in self.losses.items():
            out[k] = reduce(v).item() / (self.count * world)
        out["imbalance_max"] = max(v["imbalance"] for v in layers.values())
        extra = reduce(torch.tensor([float(self.extra_flops), float(self.competitions), float(self.tokens)],
                                    dtype=torch.float64, device=loads.device)).tolist()
        if extra[1]:
            # Competition work (fwd + bwd) per training token, reported apart from model FLOPs and MFU.
            out["competitions"] = extra[1] / world
            out["extra_flops_per_token"] = 3 * extra[0] / max(extra[2], 1)
        return out


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics log that belong to steps <= `step` (a torn last line is dropped)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsLog:
    """logs/metrics.jsonl (one JSON object per line) and optionally TensorBoard. Rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        """`resume_step`: the step training continues from. Records of later steps, left by an
        attempt that did not reach a checkpoint (killed, stopped, or resumed from an older one), are
        dropped, so the log holds each step once and matches the run that continues."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        path = run_dir / "logs" / "metrics.jsonl"
        if path.is_file():
            atomic_write_text(path, "".join(_records_up_to(path, resume_step)))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MoectlError("train.tensorboard needs the tensorboard package",
                                  hint="pip install 'moectl[tb]', or set train.tensorboard=false") from None
            # purge_step hides TensorBoard events past the resume point, like the JSON log.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = "eval" if record.get("type") == "eval" else "train"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
            for name, layer in record.get("layers", {}).items():
                self.tb.add_scalar(f"{prefix}/imbalance/{name}", layer["imbalance"], record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix product on this device and dtype: the MFU denominator, measured
    rather than taken from a datasheet."""
    n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)   # leaves the global generators untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
