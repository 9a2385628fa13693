"""Expert parallelism's exchange at 2 and 4 gloo processes against the unsharded computation (one
process, the whole bank, every process's rows in one batch): outputs equal and every gradient
within 1e-6, for the loop and grouped_mm backends, with balanced routing, one hot expert, a process
that receives no rows, and dropped slots."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.processes]

E, K, D, H, T = 8, 2, 16, 24, 12
CASES = ["balanced", "hot", "one rank idle", "dropped"]


def _inputs(rank: int, case: str):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=g)
    if case == "hot":        # every token's first expert is expert 0
        ids = torch.stack([torch.tensor([0, 1 + int(torch.randint(0, E - 1, (1,), generator=g))]) for _ in range(T)])
    elif case == "one rank idle":   # every row goes to the first process's experts
        ids = torch.stack([torch.randperm(E // 4, generator=g)[:K] for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    valid = (torch.rand(T, K, generator=g) > 0.3) if case == "dropped" else None
    return x, ids, w, valid, torch.randn(T, D, generator=g)


def _bank(backend: str):
    from moectl.core.experts import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(E, D, H, backend=backend)
    bank.init_weights(0.3, 0.3)
    return bank


def _compare(rank: int, world: int, backend: str, case: str) -> dict:
    from moectl.core.experts import run_experts
    from moectl.train.expert_parallel import AllToAllExchange, shard_bank

    # the reference: one process with the whole bank and every process's rows in one batch (what a
    # single-process run with the same global batch computes)
    ref = _bank(backend)
    parts = [_inputs(r, case) for r in range(world)]
    x_all = torch.cat([p[0] for p in parts]).requires_grad_()
    valid_all = torch.cat([p[3] for p in parts]) if parts[0][3] is not None else None
    y_all, _ = run_experts(ref, x_all, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), valid_all)
    (y_all * torch.cat([p[4] for p in parts])).sum().backward()
    ref_y, ref_x = y_all.detach().split(T)[rank], x_all.grad.split(T)[rank]
    # expert parallel: this process's rows, its slice of the experts
    bank = _bank(backend)
    exchange = AllToAllExchange(E)
    shard_bank(bank, exchange)
    x, ids, w, valid, g = parts[rank]
    x = x.clone().requires_grad_()
    y, _ = run_experts(bank, x, ids, w, valid)
    (y * g).sum().backward()
    part = exchange.local_slice()
    return {"y_equal": bool(torch.equal(y.detach(), ref_y)), "y_diff": float((y.detach() - ref_y).abs().max()),
            "x_grad": float((x.grad - ref_x).abs().max()),
            "w_grad": max(float((getattr(bank, n).grad - getattr(ref, n).grad[part]).abs().max())
                          for n in ("w1", "w3", "w2")),
            "local_shape": tuple(bank.w1.shape)}


def _worker(rank: int, world: int, port: int, backend: str, out: dict):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in CASES:
            out[(rank, case)] = _compare(rank, world, backend, case)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("world", [2, 4])
def test_exchange_matches_the_unsharded_experts(world, backend):
    """Every case in one launch of `world` processes. The loop backend is exact (each expert's rows
    arrive in the order the single process has them); grouped_mm's CPU kernel may round the last bit
    differently when an expert's rows start at another offset of its buffer, so its outputs are held
    to 1e-6 like the gradients."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), backend, out), nprocs=world, join=True)
    for rank in range(world):
        for case in CASES:
            r = out[(rank, case)]
            assert r["local_shape"] == (E // world, D, H), r
            assert r["y_equal"] if backend == "loop" else r["y_diff"] <= 1e-6, (rank, case, r)
            assert r["x_grad"] <= 1e-6 and r["w_grad"] <= 1e-6, (rank, case, r)
