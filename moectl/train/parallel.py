"""The one distributed path: processes from the launcher's environment, DDP or FSDP2.

Any launcher that sets the usual variables works the same way: `moectl train --nproc N`, torchrun,
`accelerate launch --multi_gpu` (accelerate's torchrun-based launcher, which also runs CPU
processes), on one machine or several; a SLURM step that srun started with several tasks is mapped
to them (`slurm_variables`). Each process reads RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, joins a process group (gloo on CPU, NCCL on GPUs) and trains its
share of the global batch; `parallel: ddp` replicates the model (PyTorch's
DistributedDataParallel), `parallel: fsdp` shards it (PyTorch's `fully_shard`). Precision is
not this module's business: the trainer applies autocast once, around the forward.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from moectl.errors import MoectlError, RuntimeFailure

joined = False   # this process joined a process group (an error then ends it at once: cli.common.fail)


@dataclass
class Processes:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    store: dist.Store | None = None   # the rendezvous store (for an orderly teardown)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_number(name: str, default, kind=int):
    value = os.environ.get(name, "")
    try:
        return kind(value) if value else default
    except ValueError:
        raise MoectlError(f"{name}={value!r} in the environment is not a number") from None


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def first_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list: 'gpu-[003-005,007],cpu1' -> 'gpu-003' (None if unreadable)."""
    m = re.match(r"^([^,\[\]]+)(?:\[([0-9]+)[^\]]*\])?", nodelist.strip())
    if not m:
        return None
    return m.group(1) + (m.group(2) or "")


def slurm_variables(env: dict[str, str]) -> dict[str, str]:
    """The process-group variables of a task of a SLURM step that srun started with several tasks
    (and no torchrun, which would set WORLD_SIZE itself): {} outside such a step. A multi-node step
    without MASTER_ADDR whose node list cannot be read is refused rather than trained alone."""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return {}
    tasks = env.get("SLURM_STEP_NUM_TASKS")   # set by srun for its step, not in the batch script itself
    if not tasks or not tasks.isdigit() or int(tasks) < 2:
        return {}
    out = {"WORLD_SIZE": tasks, "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
        host = "127.0.0.1" if nodes == "1" else first_host(env.get("SLURM_STEP_NODELIST")
                                                          or env.get("SLURM_JOB_NODELIST") or "")
        if host is None:
            raise MoectlError(
                f"this SLURM step has {tasks} tasks on {nodes} nodes, and neither MASTER_ADDR nor the node list "
                "says where they meet",
                hint="export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) before "
                "srun, or launch srun torchrun --nnodes ... (see docs/training.md)")
        out["MASTER_ADDR"] = host
    if "MASTER_PORT" not in env:   # jobs sharing a node meet on different ports
        job = env.get("SLURM_JOB_ID", "0")
        out["MASTER_PORT"] = str(20000 + int(job) % 10000 if job.isdigit() else 29500)
    return out


def start() -> Processes:
    """Join the launcher's process group (if it started several processes) and pick the device."""
    os.environ.update(slurm_variables(dict(os.environ)))
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ and "ACCELERATE_USE_CPU" in os.environ:
        # accelerate's plain launcher sets MASTER_ADDR only when asked for several processes, but on
        # a machine without several GPUs it starts just this one: refuse instead of training alone.
        raise MoectlError(
            "accelerate launch was asked for several processes but started only one (it does that without "
            "several GPUs)",
            hint="add --multi_gpu (accelerate's torchrun launcher; it runs CPU processes too): accelerate launch "
            "--multi_gpu --num_processes N -m moectl train ...; or use moectl train --nproc N, or torchrun. "
            "For one process, unset MASTER_ADDR.")
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        return Processes(rank, world, local, device)
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT", 29500)
    timeout = datetime.timedelta(seconds=_env_number("MOECTL_RENDEZVOUS_TIMEOUT", 600.0, float))
    try:
        store = _store(addr, port, rank, world, timeout)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                device_id=device if cuda else None)
        global joined
        joined = True
    except (RuntimeError, ValueError, OSError) as e:   # torch's DistNetworkError / DistStoreError among them
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeFailure(
            f"process {rank} of {world} could not join the others at {addr}:{port} within "
            f"{timeout.total_seconds():.0f} s ({first})",
            hint="start every process (the launcher does: moectl train --nproc N, torchrun, accelerate launch "
            "--multi_gpu); WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT must agree") from None
    return Processes(rank, world, local, device, store)


def _store(addr: str, port: int, rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT: hosted by rank 0, or by torchrun's agent."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent, timeout=timeout,
                          multi_tenant=not agent)
    return dist.PrefixStore(f"moectl/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def wrap(model: nn.Module, parallel: str, procs: Processes, experts: set[nn.Parameter] | None = None) -> nn.Module:
    """Place the model on its device and make it data-parallel across the processes. `experts`:
    expert parallelism's shards, which it synchronises itself: under DDP the model stays unwrapped
    (every other gradient is then summed by expert parallelism too), under FSDP they are left out
    of its sharding and every other parameter is sharded over all processes."""
    model.to(procs.device)
    if procs.world == 1:
        return model
    if parallel == "fsdp":
        mesh = init_device_mesh(procs.device.type, (procs.world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh, ignored_params=experts)
        fully_shard(model, mesh=mesh, ignored_params=experts)
        return model
    if experts is not None:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda"
                                               else None)


def gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are synchronised only when `sync`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = only measure it); works on plain and sharded parameters."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not active():
        return t
    t = t.clone()   # out of place: the input may be needed as it was
    dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (autograd-free inputs only)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process went away (it failed, and says why)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def barrier() -> None:
    if active():
        dist.barrier()


def close(procs: Processes, wait: bool) -> None:
    """Leave the process group before exit. The first process hosts the rendezvous store (unless
    torchrun's agent does), so it leaves last: if it exited while a peer was still tearing down,
    that peer would abort. `wait=False` after a failure on this process alone: leave at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not wait or procs.store is None:
        dist.destroy_process_group()
        return
    dist.barrier()
    dist.destroy_process_group()
    if procs.rank != 0:
        procs.store.add("closed", 1)
        return
    deadline = time.monotonic() + 60
    while procs.store.add("closed", 0) < procs.world - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
