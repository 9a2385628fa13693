"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moectl.core.accounting import component_parameters
from moectl.recipe.schema import TrainConfig

NO_DECAY_COMPONENTS = ("embedding", "norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; no decay on norms, biases and embeddings (1-D tensors and embedding tables).
    Each group is named, so `apply_hyperparameters` can set its decay again after a resume."""
    decay, no_decay = [], []
    for _, p, component, _ in component_parameters(model):
        if p.requires_grad:
            (no_decay if p.ndim < 2 or component in NO_DECAY_COMPONENTS else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    # FSDP's parameters are DTensors; expert parallelism's expert shards stay plain tensors beside
    # them, and fused (or foreach) AdamW refuses a group that mixes the two: such a mix is split.
    split = []
    for g in groups:
        kinds = [[p for p in g["params"] if isinstance(p, DTensor) == dt] for dt in (True, False)]
        split += [{**g, "params": ps} for ps in kinds if ps] if all(kinds) else [g]
    return split


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; its fused kernel (one pass over each tensor) where every parameter allows it."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused or None)


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """The recipe's AdamW settings on every group. A resumed run calls this after loading the
    optimizer state, so a changed recipe (lower lr, other betas or decay) applies from there on."""
    for group in optimizer.param_groups:
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay if group.get("name") == "decay" else 0.0)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: TrainConfig,
           schedule: Schedule | None = None) -> float:
    """Set the learning rate of optimizer step `step` (a function of the step and the run's
    schedule segments, so resuming needs no scheduler state). Returns it."""
    lr = (schedule or Schedule.fresh(total_steps)).lr(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class Segment:
    """From optimizer step `start` on, the schedule of a run of `total` steps; a segment after the
    first starts at `start_lr` (the learning rate the run had reached) instead of the peak."""

    start: int
    total: int
    start_lr: float | None = None


@dataclass
class Schedule:
    """The learning-rate schedule of a run, as segments. A run starts with one (the recipe's
    schedule over its budget). When a resumed run's budget differs from the one its checkpoint was
    trained towards (train.max_steps raised to extend a run, or lowered), a segment begins at the
    resume step: it starts at the learning rate the run had reached there and follows the recipe's
    schedule shape over the remaining steps down to min_lr (cosine: a cosine from that value;
    wsd: stable at that value, then the linear decay; constant: that value). So the learning rate
    never jumps at a resume."""

    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def fresh(cls, total_steps: int) -> Schedule:
        return cls([Segment(0, total_steps)])

    @classmethod
    def from_state(cls, state: Any, total_steps: int) -> Schedule:
        """The schedule a checkpoint saved (`state_dict`), or a fresh one for older checkpoints."""
        try:
            segments = [Segment(int(s["start"]), int(s["total"]), None if s.get("start_lr") is None
                                else float(s["start_lr"])) for s in state]
        except (TypeError, KeyError, ValueError):
            segments = []
        return cls(segments) if segments else cls.fresh(total_steps)

    def state_dict(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.segments]

    @property
    def total(self) -> int:
        return self.segments[-1].total

    def resumed(self, step: int, total_steps: int, cfg: TrainConfig) -> Schedule:
        """This schedule continued at `step` towards a budget of `total_steps`."""
        if total_steps == self.total:
            return self
        if step < cfg.warmup_steps and len(self.segments) == 1:
            return Schedule.fresh(total_steps)   # warmup depends on the step alone: nothing to continue
        kept = [s for s in self.segments if s.start < step]
        return Schedule([*kept, Segment(step, total_steps, self.lr(step, cfg))])

    def lr(self, step: int, cfg: TrainConfig) -> float:
        seg = next(s for s in reversed(self.segments) if s.start <= step or s is self.segments[0])
        if seg.start_lr is None:
            return cfg.lr * lr_factor(step, seg.total, cfg)
        floor = cfg.lr * cfg.min_lr_ratio
        span = max(1, seg.total - seg.start - 1)
        progress = min(1.0, max(0.0, (step - seg.start) / span))
        if cfg.lr_schedule == "constant" or seg.start_lr <= floor:
            return seg.start_lr
        if cfg.lr_schedule == "cosine":
            return floor + (seg.start_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(cfg.decay_fraction * span))
        into_decay = step - (seg.total - decay_steps)
        if into_decay < 0:
            return seg.start_lr
        return seg.start_lr - (seg.start_lr - floor) * min(1.0, (into_decay + 1) / decay_steps)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable, then a linear decay over the final decay_fraction of the steps
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
