"""One optimizer step: the training step `moectl train` takes at every step and `moectl profile` times.

Every micro-batch runs forward (under autocast, applied here once) and backward, with gradients
synchronised on the last one; the processes agree on the loss and gradient norm; gradients are
clipped; AdamW steps when both are finite; routers adapt to the step's global expert loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moectl.core.model import MoETransformer
from moectl.core.moe import RoutingRecord
from moectl.core.stages import record_stage
from moectl.core.stats import RoutingAccumulator
from moectl.errors import MoectlError
from moectl.train import parallel
from moectl.train.compiling import compiler_error


@dataclass
class StepOutcome:
    """What one step did, agreed across processes (losses and norm are means over micro-batches
    and processes)."""

    loss: float
    aux: float
    grad_norm: float
    stepped: bool                          # False: a non-finite loss or norm, the optimizer did not step
    records: list[list[RoutingRecord]]     # this process's routing records, per micro-batch


class TrainStep:
    """The training step of a model (`model`, possibly wrapped for data parallelism, around `core`)
    and its optimizer, in a run of `world` processes; `reduce` sums a tensor over them."""

    def __init__(self, model: nn.Module, core: MoETransformer, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, bf16: bool, grad_clip: float, compiled: bool = False, world: int = 1,
                 reduce: Callable[[Tensor], Tensor] = parallel.all_reduce_sum, sharding=None):
        self.model, self.core, self.optimizer = model, core, optimizer
        self.sharding = sharding   # expert parallelism (moectl.train.expert_parallel): syncs and clips itself
        self.device, self.bf16, self.grad_clip, self.compiled = device, bf16, grad_clip, compiled
        self.world, self.reduce = world, reduce

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast around the forward when the run's precision is bf16, once, for every path."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def __call__(self, micro_batches: Sequence[tuple[Tensor, Tensor]], step: int) -> StepOutcome:
        """Step `step` (counting from 0) over micro-batches of (tokens, next tokens)."""
        device, n_micro = self.device, len(micro_batches)
        loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        routing = RoutingAccumulator()
        records = []
        for micro, (x, y) in enumerate(micro_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with parallel.gradient_sync(self.model, micro == n_micro - 1):
                with self.autocast():
                    out = self.model(x, y, step=step)
                self.backward(out.total_loss / n_micro)
            loss_sum += out.loss.detach()
            aux_sum += out.aux_loss.detach()
            routing.add(out.records)
            records.append(out.records)
        if self.sharding is not None:
            self.sharding.sync_gradients(self.core)
            grad_norm = self.sharding.clip(self.core, self.grad_clip)
        else:
            grad_norm = parallel.clip_gradients(self.model, self.grad_clip)
        agreed = self.reduce(torch.stack([loss_sum, aux_sum, grad_norm.float().to(device)]))
        n = n_micro * self.world
        loss, aux, norm = agreed[0].item() / n, agreed[1].item() / n, agreed[2].item() / self.world
        stepped = math.isfinite(loss) and math.isfinite(norm)
        if stepped:
            with record_stage("optimizer"):
                self.optimizer.step()
            if routing.names:
                self.core.after_step(list(self.reduce(torch.stack(routing.load))))
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss, aux, norm, stepped, records)

    def backward(self, loss: Tensor) -> None:
        """loss.backward(); with a compiled model a failure to compile the backward (which happens at
        the first backward, past the per-block fallback of the forward) is a message."""
        if not self.compiled:
            loss.backward()
            return
        try:
            loss.backward()
        except Exception as e:   # only compiler failures become messages; the rest is raised again
            if not compiler_error(e):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise MoectlError(f"train.compile: compiling the backward pass failed ({type(e).__name__}: {first})",
                              hint="train with train.compile: false") from None
