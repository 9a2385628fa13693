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


# --------------------------------------------------------------------------- training end to end

def _records(run):
    import json

    return {r["step"]: r for r in map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"}


SPECS = {
    "topk": [],
    "shared experts": ["model.moe.shared_experts=1", "model.moe.shared_hidden=32"],
    "recurrent (RMoE)": ["model.moe.router={kind: recurrent}"],
    "cartesian": ["model.moe.block=cartesian"],
    "top-p": ["model.moe.router={kind: topp}"],
    # both layers compete at steps 1 and 3 (of 0..4), so every expert's response crosses the exchange
    "CompeteSMoE": ["model.moe.competition={rate: 0.5, warmup: 0, max_layers: 2}"],
    # GPT-OSS's parts: expert biases (sharded with their experts), the clamped SwiGLU, a router bias,
    # sinks and alternating windows
    "GPT-OSS parts": ["model.activation=swiglu_clamped", "model.moe.expert_bias=true",
                      "model.moe.router={kind: topk, gate_bias: true}", "model.attention_sinks=true",
                      "model.sliding_window=8", "model.sliding_layers=even"],
}


def _moectl(args, timeout=600):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "moectl", "train", *map(str, args), "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= tol, (step, key, a[step][key], b[step][key])


@pytest.fixture
def ep_recipe(corpus, write):
    from tests.conftest import train_recipe_text

    return write("r.yaml", train_recipe_text(corpus, max_steps=5, eval_every="null", checkpoint_every=3,
                                             log_every=1, grad_clip=0.05))


@pytest.mark.train
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_two_processes_with_experts_split_follow_one(spec, parallel, ep_recipe, tmp_path):
    """--nproc 2 train.expert_parallel=2 (each process holds half of every expert bank), under DDP
    and under FSDP for the other parameters, follows one process with the same global batch: loss,
    aux loss and grad_norm within 1e-5 for 5 steps, with a gradient clip that binds."""
    from moectl.recipe.load import load_recipe
    from moectl.train.trainer import train

    train(load_recipe(ep_recipe, ["train.batch_size=4", *SPECS[spec]]), run_dir=tmp_path / "one", resume="never",
          show_progress=False)
    _moectl([ep_recipe, "train.batch_size=2", "train.expert_parallel=2", f"train.parallel={parallel}", *SPECS[spec],
             "--nproc", "2", "--run-dir", tmp_path / "ep"])
    one, ep = _records(tmp_path / "one"), _records(tmp_path / "ep")
    _close(one, ep)
    assert one[1]["grad_norm"] > 0.05                     # the clip binds
    assert all(r["exchange_s_per_step"] > 0 and 0 < r["exchange_share"] < 1 for r in ep.values())
    if spec == "CompeteSMoE":                             # competition steps happened
        assert sum(r.get("competitions", 0) for r in ep.values()) > 0, ep


@pytest.mark.train
@pytest.mark.parametrize(("spec", "parallel"), [*((spec, "ddp") for spec in SPECS), ("topk", "fsdp"),
                                                 ("CompeteSMoE", "fsdp")])
def test_data_and_expert_parallel_together(spec, parallel, ep_recipe, tmp_path):
    """Four processes, dp 2 x ep 2, follow one process with the same global batch."""
    from moectl.recipe.load import load_recipe
    from moectl.train.trainer import train

    train(load_recipe(ep_recipe, ["train.batch_size=4", *SPECS[spec]]), run_dir=tmp_path / "one", resume="never",
          show_progress=False)
    _moectl([ep_recipe, "train.batch_size=1", "train.expert_parallel=2", f"train.parallel={parallel}", *SPECS[spec],
             "--nproc", "4", "--run-dir", tmp_path / "ep"])
    _close(_records(tmp_path / "one"), _records(tmp_path / "ep"))


@pytest.mark.train
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_gradient_accumulation_and_activation_checkpointing(parallel, ep_recipe, tmp_path):
    """Two micro-batches per step and recomputed blocks (whose recomputation exchanges again) under
    expert parallelism follow plain data parallelism with the same micro-batches. (Not one process:
    with micro-batches the balance loss sees each micro-batch's own tokens, which differ from one
    process's micro-batches under data parallelism already, by about 4e-5 in grad_norm here.)"""
    both = ["train.batch_size=1", "train.grad_accum=2", "train.activation_checkpointing=true",
            f"train.parallel={parallel}", "--nproc", "2"]
    _moectl([ep_recipe, *both, "--run-dir", tmp_path / "dp"])
    _moectl([ep_recipe, *both, "train.expert_parallel=2", "--run-dir", tmp_path / "ep"])
    _close(_records(tmp_path / "dp"), _records(tmp_path / "ep"))


@pytest.mark.train
def test_bf16_follows_ddp(ep_recipe, tmp_path):
    """bf16 autocast under expert parallelism follows DDP at the same process count and batch (the
    same shapes in every bf16 matmul; the experts compute in fp32 on the CPU)."""
    bf16 = ["train.precision=bf16", "train.batch_size=2", "--nproc", "2"]
    _moectl([ep_recipe, *bf16, "--run-dir", tmp_path / "ddp"])
    _moectl([ep_recipe, *bf16, "train.expert_parallel=2", "--run-dir", tmp_path / "ep"])
    _close(_records(tmp_path / "ddp"), _records(tmp_path / "ep"))


def _shares(rank: int, world: int, port: int, recipe: str, out: dict):
    import torch.distributed as dist

    from moectl.factory import build_model
    from moectl.recipe.load import load_recipe
    from moectl.train.expert_parallel import ExpertSharding
    from moectl.train.optim import make_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = load_recipe(recipe)
        whole = build_model(r)
        total = {n: p.numel() for n, p in whole.named_parameters()}
        core = build_model(r)
        sharding = ExpertSharding(core, rank, world, world)
        optimizer = make_optimizer(core, r.train)
        x = torch.randint(0, r.model.vocab_size, (2, r.model.seq_len))
        core(x, x).total_loss.backward()
        sharding.sync_gradients(core)
        optimizer.step()
        params = dict(core.named_parameters())
        out[rank] = {"total": total, "sharded": sorted(sharding.sharded),
                     "local": {n: p.numel() for n, p in params.items()},
                     "state": {n: {k: v.numel() for k, v in optimizer.state[params[n]].items() if v.dim()}
                               for n in params}}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_each_process_holds_a_share_of_the_experts_and_their_adamw_state(world, corpus, write):
    """With N processes each holds exactly 1/N of every expert tensor, and AdamW keeps exactly that
    much state for it; every other parameter (and its state) is whole."""
    import torch.multiprocessing as mp

    from tests.conftest import train_recipe_text

    recipe = write("r.yaml", train_recipe_text(corpus).replace("num_experts: 4", "num_experts: 8"))
    out = mp.Manager().dict()
    mp.spawn(_shares, args=(world, _free_port(), str(recipe), out), nprocs=world, join=True)
    for rank in range(world):
        r = out[rank]
        assert len(r["sharded"]) == 6    # w1, w3, w2 of both layers
        for name, n in r["total"].items():
            share = n // world if name in r["sharded"] else n
            assert r["local"][name] == share, (name, r["local"][name], n)
            assert r["state"][name] == {"exp_avg": share, "exp_avg_sq": share}, (name, r["state"][name])


@pytest.mark.train
def test_expert_choice_follows_ddp_at_the_same_process_count(ep_recipe, tmp_path):
    """Expert choice picks tokens per process (capacity per process), under DDP as under EP."""
    ec = "model.moe.router={kind: expert_choice}"
    _moectl([ep_recipe, "train.batch_size=2", ec, "--nproc", "2", "--run-dir", tmp_path / "ddp"])
    _moectl([ep_recipe, "train.batch_size=2", ec, "train.expert_parallel=2", "--nproc", "2", "--run-dir",
             tmp_path / "ep"])
    _close(_records(tmp_path / "ddp"), _records(tmp_path / "ep"))


@pytest.mark.train
def test_checkpoints_stay_global(ep_recipe, tmp_path):
    """An EP=2 run's step-3 checkpoint holds every expert and resumes in one process and at dp 2 x
    ep 2 within 1e-6 of the uninterrupted run; a one-process checkpoint resumes at EP=2."""
    from safetensors.torch import load_file

    from moectl.recipe.load import load_recipe
    from moectl.rundir import CheckpointDir
    from moectl.train.trainer import train

    _moectl([ep_recipe, "train.batch_size=2", "train.expert_parallel=2", "--nproc", "2", "--run-dir", tmp_path / "ep"])
    step3 = CheckpointDir(tmp_path / "ep" / "checkpoints").step_dir(3)
    weights = load_file(str(step3 / "model.safetensors"))
    assert weights["layers.0.mlp.moe.experts.w1"].shape[0] == 4      # all 4 experts, not a process's 2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(step3, resumed / "checkpoints" / step3.name)
    for name in ("config.yaml", "tokenizer.json", "data.json"):
        shutil.copy(tmp_path / "ep" / name, resumed / name)
    (resumed / "checkpoints" / "latest").write_text(step3.name + "\n")
    wide = tmp_path / "wide"   # the same checkpoint, resumed at dp 2 x ep 2
    shutil.copytree(resumed, wide)
    train(load_recipe(ep_recipe, ["train.batch_size=4"]), run_dir=resumed, resume="auto", show_progress=False)
    _moectl([ep_recipe, "train.batch_size=1", "train.expert_parallel=2", "--nproc", "4", "--run-dir", wide])
    ep = _records(tmp_path / "ep")
    for again in (_records(resumed), _records(wide)):
        assert sorted(again) == [4, 5]
        for step in (4, 5):
            for key in ("loss", "grad_norm"):
                assert abs(ep[step][key] - again[step][key]) <= 1e-6, (step, key, ep[step][key], again[step][key])
    # a DDP run's checkpoint, continued with the experts split
    _moectl([ep_recipe, "train.batch_size=2", "train.max_steps=3", "--nproc", "2", "--run-dir", tmp_path / "ddp"])
    _moectl([ep_recipe, "train.batch_size=2", "train.expert_parallel=2", "--nproc", "2", "--run-dir",
             tmp_path / "ddp"])
    assert sorted(_records(tmp_path / "ddp")) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("overrides", "words"), [
    (["train.expert_parallel=3"], "must divide model.moe.num_experts"),
    (["train.expert_parallel=2", "model.moe=null"], "no model.moe"),
])
def test_expert_parallel_recipe_refusals(overrides, words, corpus, write, cli):
    from tests.conftest import train_recipe_text

    path = write("r.yaml", train_recipe_text(corpus, max_steps=2))
    r = cli("recipes", "validate", path, *overrides)
    assert r.exit_code == 2 and words in r.output, r.output


@pytest.mark.train
def test_expert_parallel_in_one_process_is_refused(corpus, write, cli, tmp_path):
    from tests.conftest import train_recipe_text

    path = write("r.yaml", train_recipe_text(corpus, max_steps=2))
    r = cli("train", path, "train.expert_parallel=2", "--run-dir", tmp_path / "run", "-q")
    assert r.exit_code == 2 and "needs a number of processes it divides" in r.output, r.output


FAULT_PLUGIN = '''\
"""Test plugin: the second process dies in the middle of its fifth exchange (after the counts, before the rows)."""
import os

from moectl.train import expert_parallel

calls = [0]
original = expert_parallel.AllToAllExchange._send


def _send(self, *args, **kwargs):
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == 5:
        os._exit(9)
    return original(self, *args, **kwargs)


expert_parallel.AllToAllExchange._send = _send
'''


@pytest.mark.train
def test_a_process_lost_mid_exchange_stops_its_peers(ep_recipe, tmp_path):
    """The second process dies inside an exchange; the first, waiting in that exchange, stops with the
    lost-peer message (no hang, no traceback) and the launch fails."""
    import subprocess
    import sys

    from tests.conftest import REPO

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "epfault.py").write_text(FAULT_PLUGIN)
    recipe = tmp_path / "fault.yaml"
    recipe.write_text("plugins: [epfault]\n" + ep_recipe.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{plugins}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(recipe), "train.batch_size=2",
                           "train.expert_parallel=2", "--nproc", "2", "--run-dir", str(tmp_path / "run"), "-q"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "another process of the run stopped, so this one stops too" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


VARIANT_PLUGIN = '''\
"""Test plugin: a routed-layer variant that does not say whether it runs under expert parallelism."""
from dataclasses import dataclass

from moectl.core import RoutedFFN, option, register_variant


@dataclass
class ProbeOptions:
    """A probe."""

    scale: float = option(1.0, "Unused.")


@register_variant("probe", options=ProbeOptions, summary="A test variant; null = none.")
class ProbeFFN(RoutedFFN):
    pass
'''


def test_a_variant_that_does_not_declare_expert_parallelism_is_refused(corpus, write, tmp_path):
    """A plugin's routed-layer variant might reach every expert directly: without `expert_parallel =
    True` on its class, expert parallelism refuses it by name; with it, the recipe is valid."""
    import subprocess
    import sys

    from tests.conftest import REPO, train_recipe_text

    (tmp_path / "probe_variant.py").write_text(VARIANT_PLUGIN)
    path = write("r.yaml", "plugins: [probe_variant]\n" + train_recipe_text(corpus, max_steps=2))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    args = [sys.executable, "-m", "moectl", "recipes", "validate", str(path), "model.moe.probe={scale: 2.0}"]
    refused = subprocess.run([*args, "train.expert_parallel=2"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "model.moe.probe does not declare support for expert parallelism" in refused.stdout + refused.stderr
    (tmp_path / "probe_variant.py").write_text(VARIANT_PLUGIN.replace("    pass", "    expert_parallel = True"))
    accepted = subprocess.run([*args, "train.expert_parallel=2"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
