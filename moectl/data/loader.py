"""Fixed-length sequences cut from a token stream, in a deterministic order.

The stream (documents joined by end-of-text tokens) is cut into non-overlapping windows of
seq_len + 1 tokens (inputs and shifted targets). Training visits the windows in a permutation
drawn from (seed, epoch). The sequences of optimizer step s are global positions
s*G .. s*G+G-1 (G = batch_size * grad_accum * world_size); rank r's micro-batch m takes its own
slice of them. The position is a function of the step alone, so resuming needs only the step, and
any process count with the same global batch sees the same sequences.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class PackedSequences:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * S: i * S + S + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class TrainOrder:
    """Which sequences each (step, micro-batch, rank) trains on."""

    def __init__(self, num_sequences: int, seed: int, batch_size: int, grad_accum: int,
                 world_size: int = 1, rank: int = 0):
        self.n, self.seed = num_sequences, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.global_batch = batch_size * grad_accum * world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch in memory
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + self.rank * self.batch_size * self.grad_accum + micro * self.batch_size
        out = []
        for g in range(start, start + self.batch_size):
            epoch, pos = divmod(g, self.n)
            out.append(int(self._perm(epoch)[pos]))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


def eval_indices(num_sequences: int, batch_size: int, num_batches: int, world_size: int, rank: int) -> list[list[int]]:
    """The first num_batches * batch_size validation sequences (fewer if the split is small), as
    batches dealt round-robin to the ranks."""
    return _eval_batches(num_sequences, batch_size, num_batches)[rank::world_size]


def eval_rounds(num_sequences: int, batch_size: int, num_batches: int, world_size: int) -> int:
    """The most validation batches any rank gets (every rank runs that many forwards)."""
    return math.ceil(len(_eval_batches(num_sequences, batch_size, num_batches)) / world_size)


def _eval_batches(num_sequences: int, batch_size: int, num_batches: int) -> list[list[int]]:
    total = min(num_sequences, batch_size * num_batches)
    return [list(range(i, min(i + batch_size, total))) for i in range(0, total, batch_size)]
