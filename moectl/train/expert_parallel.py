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
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

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
    from torch import nn

    part = exchange.local_slice()
    for name in ("w1", "w3", "w2"):
        w = getattr(bank, name)
        if w is not None:
            setattr(bank, name, nn.Parameter(w.detach()[part].clone(), requires_grad=w.requires_grad))
    bank.exchange = exchange
