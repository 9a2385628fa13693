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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from moectl.core.experts import ExpertBank
from moectl.errors import MoectlError


class AllToAllExchange:
    """The exchange of one expert-parallel group, installed as `ExpertBank.exchange`."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_experts % self.size:
            raise MoectlError(f"expert parallelism over {self.size} processes needs num_experts divisible by "
                              f"{self.size}, not {num_experts}")
        self.num_experts, self.local = num_experts, num_experts // self.size

    def local_slice(self) -> slice:
        """The experts this process holds (their ids in the global numbering)."""
        return slice(self.rank * self.local, (self.rank + 1) * self.local)

    def __call__(self, x_ND: Tensor, counts_E: Tensor, run_local: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        N, L = self.size, self.local
        counts = counts_E.to(torch.int64).cpu()
        used = int(counts.sum())
        # 1. counts: E per process out, E/N from each source in ([source, local expert])
        got_counts = torch.empty_like(counts)
        dist.all_to_all_single(got_counts, counts, group=self.group)
        got_counts = got_counts.view(N, L)
        send = counts.view(N, L).sum(1).tolist()
        recv = got_counts.sum(1).tolist()
        # 2. the rows
        rows = wait_tensor(all_to_all_single_autograd(x_ND[:used].contiguous(), recv, send, self.group))
        # 3. (source, expert) blocks -> (expert, source), run the local experts, and back
        block = torch.arange(N * L).repeat_interleave(got_counts.reshape(-1))   # each row's block, row-major
        key = (block % L) * N + block // L                                      # expert-major order
        order = torch.sort(key, stable=True).indices.to(rows.device)
        y_local = run_local(rows[order], got_counts.sum(0).to(counts_E.device))
        y_rows = y_local[torch.argsort(order)]
        # 4. the outputs, home
        y = wait_tensor(all_to_all_single_autograd(y_rows.contiguous(), send, recv, self.group))
        rest = x_ND.shape[0] - used
        if rest:   # slots no expert took (dropped): zero, as the backends give them
            y = torch.cat([y, y.new_zeros(rest, y.shape[-1])])
        return y


def shard_bank(bank, exchange: AllToAllExchange) -> None:
    """Keep only this process's experts in `bank` (its w1, w3, w2 become their local slices, as new
    parameters) and install the exchange. `bank.num_experts` stays global: routing is unchanged."""
    part = exchange.local_slice()
    for name in ("w1", "w3", "w2"):
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
        for name, module in core.named_modules():
            if isinstance(module, ExpertBank):
                exchange = AllToAllExchange(module.num_experts, self.ep_group)
                shard_bank(module, exchange)
                for w in ("w1", "w3", "w2"):
                    if getattr(module, w) is not None:
                        self.sharded[f"{name}.{w}"] = exchange.local_slice()
        if not self.sharded:
            raise MoectlError("train.expert_parallel needs a model with routed experts", hint="set it to 1")

    # gradients ------------------------------------------------------------------------------

    def sync_gradients(self, core) -> None:
        """The data-parallel mean gradient: a replicated parameter's gradient summed over every
        process, an expert's (which the exchange already summed over its expert-parallel group)
        over its data-parallel group only; both divided by the number of processes."""
        for name, p in core.named_parameters():
            if p.grad is None:
                continue
            group = self.dp_group if name in self.sharded else None
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(self.world)

    def clip(self, core, max_norm: float) -> Tensor:
        """Clip the global gradient norm: replicated gradients count once, each expert shard once."""
        local = torch.zeros((), dtype=torch.float64)
        shard = torch.zeros((), dtype=torch.float64)
        grads = []
        for name, p in core.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = p.grad.detach().double().pow(2).sum().cpu()
            if name in self.sharded:
                shard += sq
            else:
                local += sq
        dist.all_reduce(shard, group=self.ep_group)
        norm = (local + shard).sqrt().to(torch.float32)
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
