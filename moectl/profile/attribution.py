"""Where a profiled step's time goes: each profiler event attributed to one of the engine's stages.

Forward time of a stage is the time inside its labels (`moectl.core.stages`); backward time is that
of the autograd nodes whose forward ran inside them (autograd gives each node the sequence number
of the forward op that made it, and the profiler records both). Kernel shares sort every leaf op by
what it is: matmul, attention, the loss's softmax work, or something else. FLOPs per stage come
from the model's own counts (docs/accounting.md: backward = 2 x forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import DeviceType

from moectl.core.accounting import TRAIN_FLOPS_FACTOR
from moectl.core.moe import RoutedFFN
from moectl.core.stages import PREFIX, STAGES

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


def tflops_per_s(flops: float | None, ms: float) -> float | None:
    return None if flops is None or ms <= 0 else flops / (ms * 1e-3) / 1e12


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
    f: dict[str, float] = {}

    def add(stage: str, fwd: float) -> None:
        f[stage] = f.get(stage, 0.0) + TRAIN_FLOPS_FACTOR * fwd * tokens

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
