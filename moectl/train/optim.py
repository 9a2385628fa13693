"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

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
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """The recipe's AdamW settings on every group. A resumed run calls this after loading the
    optimizer state, so a changed recipe (lower lr, other betas or decay) applies from there on."""
    for group in optimizer.param_groups:
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay if group.get("name") == "decay" else 0.0)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Set the learning rate of optimizer step `step` (a function of the step alone, so resuming
    needs no scheduler state). Returns it."""
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


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
