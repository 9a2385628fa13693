from __future__ import annotations

import numpy as np
import torch

from moectl.data.loader import PackedSequences, TrainOrder, eval_indices


def test_packed_sequences_shift():
    seqs = PackedSequences(np.arange(21, dtype=np.uint16), seq_len=4)
    assert len(seqs) == 5
    x, y = seqs.batch([0, 4])
    assert x.tolist() == [[0, 1, 2, 3], [16, 17, 18, 19]]
    assert y.tolist() == [[1, 2, 3, 4], [17, 18, 19, 20]]
    assert x.dtype == torch.int64


def test_order_covers_an_epoch_and_depends_on_seed():
    order = TrainOrder(10, seed=1, batch_size=2, grad_accum=1)
    epoch = [i for s in range(5) for i in order.indices(s, 0)]
    assert sorted(epoch) == list(range(10))
    assert epoch != [i for s in range(5) for i in TrainOrder(10, 2, 2, 1).indices(s, 0)]
    nxt = [i for s in range(5, 10) for i in order.indices(s, 0)]
    assert sorted(nxt) == list(range(10)) and nxt != epoch


def test_ranks_split_the_global_batch():
    single = TrainOrder(100, 0, batch_size=4, grad_accum=2)
    ranks = [TrainOrder(100, 0, batch_size=2, grad_accum=2, world_size=2, rank=r) for r in range(2)]
    for step in range(3):
        whole = [i for m in range(2) for i in single.indices(step, m)]
        split = [i for r in ranks for m in range(2) for i in r.indices(step, m)]
        assert sorted(whole) == sorted(split)


def test_eval_indices_round_robin():
    assert eval_indices(10, 3, 5, 1, 0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert eval_indices(10, 3, 2, 2, 1) == [[3, 4, 5]]
