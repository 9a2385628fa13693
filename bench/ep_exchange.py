"""Expert parallelism's exchange, measured: the raw all-to-all of one routed layer's rows at a
recipe's per-layer message size next to moectl's whole exchange (counts, rows, reordering, rows
back) on the same rows, with real-looking (skewed) and uniform routing. Launch it with one process
per GPU; rank 0 prints the table.

    torchrun --nproc_per_node 8 bench/ep_exchange.py                       # finegrained-1b's layer
    torchrun --nproc_per_node 2 bench/ep_exchange.py --tokens 256 --d-model 64 --experts 8   # CPU, gloo

GB/s follow nccl-tests' convention for all-to-all: algbw = bytes a process sends / time, busbw =
algbw x (N - 1) / N; compare busbw with `alltoall_perf` of nccl-tests at the same size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from moectl.core.experts import sort_slots
from moectl.train.expert_parallel import AllToAllExchange

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of fn() over `reps` runs after 3 untimed ones; every process in step."""
    times = []
    for i in range(reps + 3):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _routing(kind: str, tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Expert ids [tokens, top_k]: uniform, or skewed like a trained router (Zipf-like popularity)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        scores = torch.rand(tokens, experts, generator=g)
    else:
        popularity = 1.0 / torch.arange(1, experts + 1).float() ** 0.8
        scores = torch.rand(tokens, experts, generator=g).log() / popularity[torch.randperm(experts, generator=g)]
    return scores.topk(top_k, dim=-1).indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per process per layer (finegrained-1b: 8 x 2048)")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype] if cuda else torch.float32
    rows, elt = args.tokens * args.top_k, torch.finfo(dtype).bits // 8
    sent = rows * args.d_model * elt
    x = torch.randn(rows, args.d_model, device=device, dtype=dtype)
    out = torch.empty_like(x)
    raw = _timed(lambda: dist.all_to_all_single(out, x), args.reps, device)
    results = [("raw all_to_all_single, equal splits", raw, sent)]
    exchange = AllToAllExchange(args.experts)
    for kind in ("uniform", "skewed"):
        ids = _routing(kind, args.tokens, args.experts, args.top_k, seed=rank).to(device)
        order, counts = sort_slots(ids, None, args.experts)
        x_sorted = x[: order.numel()]
        t = _timed(lambda x_sorted=x_sorted, counts=counts: exchange(x_sorted, counts, lambda r, c: r), args.reps,
                   device)
        results.append((f"moectl exchange there and back, {kind} routing", t, 2 * sent))
    if rank == 0:
        print(f"{world} processes, {'NCCL on ' + torch.cuda.get_device_name(device) if cuda else 'gloo on CPU'}; "
              f"torch {torch.__version__}")
        print(f"per-layer message: {args.tokens} tokens x top-{args.top_k} x d_model {args.d_model} in "
              f"{args.dtype if cuda else 'fp32'} = {sent / 2**20:.1f} MiB sent by each process")
        print(f"{'what':48s} {'ms':>9s} {'algbw GB/s':>11s} {'busbw GB/s':>11s} {'x raw':>7s}")
        for name, seconds, nbytes in results:
            alg = nbytes / seconds / 1e9
            print(f"{name:48s} {seconds * 1e3:9.3f} {alg:11.2f} {alg * (world - 1) / world:11.2f} "
                  f"{seconds / (raw * nbytes / sent):7.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
