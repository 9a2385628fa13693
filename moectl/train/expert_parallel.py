"""Expert parallelism's exchange: the rows of a routed layer travel to the process that holds their
expert and come back, over torch.distributed's autograd-aware all-to-all (no transport of moectl's
own).

The engine (`moectl.core.experts.ExpertBank`) knows no collectives: it sorts a layer's rows by
global expert id, counts them per expert, and, when an exchange is installed on the bank, hands
those rows to it together with a function that runs the bank's local experts. With N processes in
the expert-parallel group and E experts, process r holds experts r*E/N .. (r+1)*E/N - 1, so the rows
bound for each process are contiguous already. One exchange:

  1. counts first: every process tells every other how many rows it sends to each of its experts
     (an all-to-all of E counts, E/N per destination);
  2. the rows, with uneven splits (all_to_all_single_autograd: its backward is the reverse exchange);
  3. the received blocks, ordered (source, expert), are reordered to (expert, source) so that each
     local expert's rows are contiguous, and the local experts run on them with the bank's backend;
  4. the outputs go back in the reverse order and by the reverse exchange.

Gradients follow by autograd: an expert weight's gradient sums the rows of every process of the
group, and an input row's gradient comes home through the backward of step 2.

CompeteSMoE's competition steps need every expert's response to every token (`every_expert`):
each process sends all its tokens to every process of the group, which runs its local experts on
all of them and sends each process its responses back, [E/N, T, D] from each (about E/K times
the traffic of a routed exchange).

The time spent in exchanges, forward and backward, is kept by an `ExchangeClock` for the training
log (host time on the CPU, CUDA events on a GPU), and the collectives carry the `exchange` stage
label that `moectl profile`'s attribution reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.tensor import DTensor

from moectl.core.experts import ExpertBank
from moectl.core.stages import record_stage
from moectl.errors import MoectlError


class ExchangeClock:
    """Time spent in exchanges since the last `take()`, forward and backward. On the CPU the host
    clock (gloo's collectives block); on a GPU CUDA events on the current stream, read only at
    `take()`, so nothing synchronises during the step. The backward part runs from the moment an
    exchange's output gradient is ready to the moment its input gradient is (the reverse collective
    plus the reordering around it)."""

    def __init__(self):
        self.seconds, self.pairs = 0.0, []

    def mark(self, device: torch.device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, start, stop) -> None:
        if isinstance(start, float):
            self.seconds += stop - start
        else:
            self.pairs.append((start, stop))

    def take(self) -> float:
        """Seconds in exchanges since the last call."""
        total, self.seconds = self.seconds, 0.0
        for start, stop in self.pairs:
            stop.synchronize()
            total += start.elapsed_time(stop) / 1e3
        self.pairs = []
        return total


class _Tick(torch.autograd.Function):
    """Identity whose backward reads the clock: placed after an exchange it marks the start of that
    exchange's backward, placed before it the end."""

    @staticmethod
    def forward(ctx, x: Tensor, clock: ExchangeClock, box: list, end: bool) -> Tensor:
        ctx.clock, ctx.box, ctx.end = clock, box, end
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        now = ctx.clock.mark(g.device)
        if ctx.end and ctx.box:
            ctx.clock.add(ctx.box.pop(), now)
        elif not ctx.end:
            ctx.box.append(now)
        return g, None, None, None


class AllToAllExchange:
    """The exchange of one expert-parallel group, installed as `ExpertBank.exchange`."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None, clock: ExchangeClock | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_experts % self.size:
            raise MoectlError(f"expert parallelism over {self.size} processes needs num_experts divisible by "
                              f"{self.size}, not {num_experts}")
        self.num_experts, self.local = num_experts, num_experts // self.size
        self.clock = clock

    def _send(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        """One autograd-aware all-to-all of rows (its backward is the reverse exchange), timed."""
        clock = self.clock
        if clock is None or not torch.is_grad_enabled() or not x.requires_grad:
            with record_stage("exchange"):
                return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, self.group))
        box: list = []
        x = _Tick.apply(x, clock, box, True)
        start = clock.mark(x.device)
        with record_stage("exchange"):
            y = wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, self.group))
        clock.add(start, clock.mark(y.device))
        return _Tick.apply(y, clock, box, False)

    def _counts(self, counts: Tensor) -> Tensor:
        """An all-to-all of the int64 counts (on the CPU for gloo; the device for NCCL)."""
        got = torch.empty_like(counts)
        start = self.clock.mark(counts.device) if self.clock is not None else None
        with record_stage("exchange"):
            dist.all_to_all_single(got, counts, group=self.group)
        if start is not None:
            self.clock.add(start, self.clock.mark(counts.device))
        return got

    def local_slice(self) -> slice:
        """The experts this process holds (their ids in the global numbering)."""
        return slice(self.rank * self.local, (self.rank + 1) * self.local)

    def __call__(self, x_ND: Tensor, counts_E: Tensor, run_local: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        N, L = self.size, self.local
        # 1. counts: E per process out, E/N from each source in ([source, local expert]); on the
        # device (NCCL exchanges device memory only), then read on the host for the splits
        got_counts = self._counts(counts_E.to(torch.int64)).cpu().view(N, L)
        counts = counts_E.to(torch.int64).cpu()
        used = int(counts.sum())
        send = counts.view(N, L).sum(1).tolist()
        recv = got_counts.sum(1).tolist()
        # 2. the rows
        rows = self._send(x_ND[:used], recv, send)
        # 3. (source, expert) blocks -> (expert, source), run the local experts, and back
        block = torch.arange(N * L).repeat_interleave(got_counts.reshape(-1))   # each row's block, row-major
        key = (block % L) * N + block // L                                      # expert-major order
        order = torch.sort(key, stable=True).indices.to(rows.device)
        y_local = run_local(rows[order], got_counts.sum(0).to(counts_E.device))
        y_rows = y_local[torch.argsort(order)]
        # 4. the outputs, home
        y = self._send(y_rows, send, recv)
        rest = x_ND.shape[0] - used
        if rest:   # slots no expert took (dropped): zero, as the backends give them
            y = torch.cat([y, y.new_zeros(rest, y.shape[-1])])
        return y

    def every_expert(self, x_TD: Tensor, run_local: Callable[[Tensor], Tensor]) -> Tensor:
        """Every expert of the group on every token of this process, [E, T, D]: the tokens go to every
        process (counts first: processes may hold different numbers), each runs its local experts on
        all of them, and each process gets its tokens' responses back, E/N experts from each."""
        N, L = self.size, self.local
        T, D = x_TD.shape
        counts = self._counts(torch.full((N,), T, dtype=torch.int64, device=x_TD.device))
        theirs = counts.tolist()                                    # tokens of each process of the group
        tokens = self._send(x_TD.unsqueeze(0).expand(N, T, D).reshape(N * T, D), theirs, [T] * N)
        o_LSD = run_local(tokens)                                   # [L, sum of theirs, D]
        o_rows = o_LSD.transpose(0, 1).reshape(-1, L * D)           # rows by source process
        mine = self._send(o_rows, [T] * N, theirs)                  # [N * T, L * D], by holder
        return mine.view(N, T, L, D).permute(0, 2, 1, 3).reshape(N * L, T, D)


def shard_bank(bank: ExpertBank, exchange: AllToAllExchange) -> None:
    """Keep only this process's experts in `bank` (its w1, w3, w2 and biases become their local
    slices, as new parameters) and install the exchange. `bank.num_experts` stays global: routing is unchanged."""
    part = exchange.local_slice()
    for name in ("w1", "w3", "w2", "b1", "b3", "b2"):
        w = getattr(bank, name)
        if w is not None:
            setattr(bank, name, nn.Parameter(w.detach()[part].clone(), requires_grad=w.requires_grad))
    bank.exchange = exchange


# --------------------------------------------------------------------------- training with it


class ExpertSharding:
    """Expert parallelism in a training run: the process groups (expert-parallel groups of `degree`
    consecutive ranks, so that with torchrun's numbering a group stays inside a node; data-parallel
    groups of the ranks that hold the same experts), the banks cut to their local experts, the
    gradient synchronisation and clipping that replace DDP's, and the conversion of checkpoint
    state between the global tensors on disk and the local shards in memory."""

    def __init__(self, core, rank: int, world: int, degree: int):
        if degree < 2 or world % degree:
            raise MoectlError(f"train.expert_parallel {degree} needs a number of processes it divides, not {world}",
                              hint=f"launch a multiple of {degree} processes (--nproc, torchrun), or set "
                              "train.expert_parallel: 1")
        self.degree, self.world, self.core = degree, world, core
        self.optimizer = None   # set once the optimizer exists (its state is gathered for checkpoints)
        self.ep_group = self.dp_group = None
        for d in range(world // degree):   # every process creates every group, in the same order
            ranks = list(range(d * degree, (d + 1) * degree))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.ep_group = group
        for e in range(degree):
            ranks = list(range(e, world, degree))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = group
        self.sharded: dict[str, slice] = {}   # parameter name -> this process's rows of the global tensor
        self.clock = ExchangeClock()
        for name, module in core.named_modules():
            if isinstance(module, ExpertBank):
                exchange = AllToAllExchange(module.num_experts, self.ep_group, self.clock)
                shard_bank(module, exchange)
                for w in ("w1", "w3", "w2", "b1", "b3", "b2"):
                    if getattr(module, w) is not None:
                        self.sharded[f"{name}.{w}"] = exchange.local_slice()
        if not self.sharded:
            raise MoectlError("train.expert_parallel needs a model with routed experts", hint="set it to 1")

    def parameters(self) -> set[nn.Parameter]:
        """The expert shards (which FSDP must leave alone)."""
        return {p for name, p in self.core.named_parameters() if name in self.sharded}

    # gradients ------------------------------------------------------------------------------

    def sync_gradients(self, core) -> None:
        """The data-parallel mean gradient: a replicated parameter's gradient summed over every
        process, an expert's (which the exchange already summed over its expert-parallel group)
        over its data-parallel group only; both divided by the number of processes. Under FSDP its
        own parameters (DTensors) are already reduced, to the same mean."""
        for name, p in core.named_parameters():
            if p.grad is None or isinstance(p.grad, DTensor):
                continue
            group = self.dp_group if name in self.sharded else None
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(self.world)

    def clip(self, core, max_norm: float) -> Tensor:
        """Clip the global gradient norm: replicated gradients count once, each expert shard once,
        each piece of an FSDP-sharded gradient once."""
        local = torch.zeros((), dtype=torch.float64)
        shard = torch.zeros((), dtype=torch.float64)
        pieces = torch.zeros((), dtype=torch.float64)
        grads = []
        for name, p in core.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grads.append(g)
            sq = g.detach().double().pow(2).sum().cpu()
            if name in self.sharded:
                shard += sq
            elif isinstance(p.grad, DTensor):
                pieces += sq
            else:
                local += sq
        device = grads[0].device if grads else torch.device("cpu")
        sums = torch.stack([shard, pieces]).to(device)
        dist.all_reduce(sums[:1], group=self.ep_group)
        dist.all_reduce(sums[1:])
        norm = (local + sums.cpu().sum()).sqrt().to(torch.float32)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.device, g.dtype))
        return norm

    # checkpoint state -----------------------------------------------------------------------

    def _gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.degree)]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def globalize(self, model_state: dict, optim_state: dict) -> None:
        """Collective: the global tensors of the expert shards, for a checkpoint (the same files
        whatever the expert-parallel degree). Gathered from the live parameters and optimizer
        state on every process (a full state dict exists on the first process only); written into
        the state dicts where they hold the entry."""
        params = dict(self.core.named_parameters())
        states = optim_state.get("state") if isinstance(optim_state, dict) else None
        for name in self.sharded:
            p = params[name]
            full = self._gather(p.detach())
            if name in model_state:
                model_state[name] = full.cpu()
            live = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            entry = states.get(name) if isinstance(states, dict) else None
            for key in sorted(live):
                value = live[key]
                if isinstance(value, Tensor) and value.dim() > 0:
                    gathered = self._gather(value.detach())
                    if isinstance(entry, dict):
                        entry[key] = gathered.cpu()

    def localize(self, model_state: dict | None = None, optim_state: dict | None = None) -> None:
        """This process's rows of the global expert tensors of a checkpoint, in place."""
        states = optim_state.get("state") if isinstance(optim_state, dict) else None
        for name, part in self.sharded.items():
            if model_state is not None and isinstance(model_state.get(name), Tensor) and model_state[name].dim():
                model_state[name] = model_state[name][part].contiguous()
            entry = states.get(name) if isinstance(states, dict) else None
            if isinstance(entry, dict):
                for key, value in entry.items():
                    if isinstance(value, Tensor) and value.dim() > 0:
                        entry[key] = value[part].contiguous()
