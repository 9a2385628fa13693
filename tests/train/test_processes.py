"""Training in real processes: signals, a kill during a checkpoint write, and data parallelism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moectl
from moectl.recipe.load import load_recipe
from moectl.rundir import CheckpointDir
from moectl.runs import load_run
from moectl.train.trainer import train
from tests.conftest import REPO, train_recipe_text
from tests.train.helpers import evals, losses

pytestmark = [pytest.mark.processes, pytest.mark.train]


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "moectl", "train", *map(str, args), "-q"], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended early ({proc.returncode}):\n{out}\n{err}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.02)


def test_sigkill_while_writing_checkpoint(corpus, write, tmp_path):
    path = write("r.yaml", train_recipe_text(corpus, max_steps=9, checkpoint_every=3, eval_every="null"))
    run = tmp_path / "run"
    proc = _start([path, "--run-dir", run], env={"MOECTL_CHECKPOINT_DELAY": "1.5"})
    ckpts = run / "checkpoints"
    # Wait until the second checkpoint (step 6) is being written, then kill without warning.
    _wait_for(lambda: (ckpts / ".step-00000006.tmp-shared" / "model.safetensors").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = CheckpointDir(ckpts).latest()
    assert latest.name == "step-00000003"
    assert load_run(latest).step == 3
    # The run resumes from there and tidies the half-written folder.
    proc = _start([path, "--run-dir", run])
    assert proc.wait(timeout=120) == 0, proc.communicate()
    assert CheckpointDir(ckpts).latest().name == "step-00000009"
    assert not list(ckpts.glob(".step-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resumes_exactly(corpus, write, tmp_path, sig):
    """A signal stops the run at the end of a step with a checkpoint and exit code 130; resuming
    reproduces the uninterrupted run exactly (cosine schedule, routing jitter)."""
    text = train_recipe_text(corpus, max_steps=400, checkpoint_every=1000, eval_every=200, warmup_steps=5)
    path = write("r.yaml", text)
    overrides = ["model.moe.router.jitter_eps=0.1"]
    run = tmp_path / "run"
    proc = _start([path, *overrides, "--run-dir", run])
    metrics = run / "logs" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume auto" in err
    stopped = CheckpointDir(run / "checkpoints").latest()
    stopped_step = int(stopped.name.split("-")[1])
    assert 3 <= stopped_step < 400
    proc = _start([path, *overrides, "--run-dir", run])
    assert proc.wait(timeout=300) == 0, proc.communicate()
    train(load_recipe(path, overrides), run_dir=tmp_path / "straight", resume="never", show_progress=False)
    assert losses(run) == losses(tmp_path / "straight")
    assert evals(run) == evals(tmp_path / "straight")


def _nproc2(path, run, *extra):
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(path), "train.batch_size=2", *extra,
                           "--nproc", "2", "--run-dir", str(run), "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


COMPETE = ["model.moe.competition.rate=0.5", "model.moe.competition.warmup=0.0"]
COMPETE_2024 = [*COMPETE, "model.moe.competition.schedule=bernoulli", "model.moe.router.kind=recurrent"]


@pytest.mark.parametrize("parallel, extra", [("ddp", []), ("fsdp", []), ("ddp", COMPETE), ("fsdp", COMPETE_2024),
                                             ("fsdp", ["model.tie_embeddings=true"])],
                         ids=["ddp", "fsdp", "ddp-competesmoe", "fsdp-competesmoe2024-rmoe", "fsdp-tied"])
def test_two_processes_match_one(corpus, write, tmp_path, parallel, extra):
    """--nproc 2 (gloo on CPU) with the same global batch follows the single-process loss curve,
    with replicated (DDP) or sharded (FSDP) parameters, and with CompeteSMoE's schedules (the same on
    every process; per-forward draws with the recurrent router too); their checkpoints resume exactly."""
    path = write("r.yaml", train_recipe_text(corpus, max_steps=5, eval_every="null", checkpoint_every=3,
                                             parallel=parallel))
    single = tmp_path / "single"
    train(load_recipe(path, ["train.batch_size=4", *extra]), run_dir=single, resume="never", show_progress=False)
    _nproc2(path, tmp_path / "dp", *extra)
    a, b = losses(single), losses(tmp_path / "dp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # Both processes wrote their random state into the one checkpoint.
    ckpt = CheckpointDir(tmp_path / "dp" / "checkpoints").latest()
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    # A checkpoint of the parallel run restarts a parallel run exactly, and loads in one process.
    _nproc2(path, tmp_path / "again", *extra, "--resume", str(tmp_path / "dp" / "checkpoints" / "step-00000003"))
    c = losses(tmp_path / "again")
    assert sorted(c) == [4, 5]
    for step in c:
        assert abs(c[step] - b[step]) < 1e-6
    assert load_run(ckpt).step == 5
    if "model.tie_embeddings=true" in extra:   # a tied weight is stored once, also when it was sharded
        from safetensors.torch import load_file

        assert "head.weight" not in load_file(ckpt / "model.safetensors")


def test_bad_data_with_two_processes(corpus, write, tmp_path):
    """A user error found by the first process is reported once, with exit code 2 and no traceback."""
    path = write("r.yaml", train_recipe_text(corpus))
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(path),
                           f"data.source.paths=['{tmp_path}/none*.txt']",
                           "--nproc", "2", "--run-dir", str(tmp_path / "run"), "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("no file matches") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("target", ["group", "launcher"])
def test_sigint_with_two_processes(corpus, write, tmp_path, target):
    """Ctrl-C (SIGINT to the whole process group) or SIGINT sent to the launcher alone reaches every
    worker once; they agree on the step, save one checkpoint and the launcher exits with 130; the
    run then resumes."""
    path = write("r.yaml", train_recipe_text(corpus, max_steps=400, checkpoint_every=1000, eval_every=200,
                                             batch_size=2))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moectl", "train", str(path), "--nproc", "2", "--run-dir",
                             str(run), "-q"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = run / "logs" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc)
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)   # what a terminal's Ctrl-C does: the whole process group
    else:
        proc.send_signal(signal.SIGINT)      # e.g. `kill -INT <launcher>`
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("interrupted at step") == 1
    latest = CheckpointDir(run / "checkpoints").latest()
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    resumed = subprocess.run([sys.executable, "-m", "moectl", "train", str(path), "train.max_steps="
                              f"{int(latest.name.split('-')[1]) + 3}", "--nproc", "2", "--run-dir", str(run), "-q"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


def _launched(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(port), "-m", "moectl"],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                "2", "--main_process_port", str(port), "-m", "moectl"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_other_launchers_give_world_size_two(corpus, write, tmp_path, launcher):
    """torchrun and `accelerate launch --multi_gpu` start two CPU processes that train as one run
    (world size 2 in the checkpoint) and follow the single-process loss curve, like --nproc 2."""
    from moectl.train.launch import free_port

    path = write("r.yaml", train_recipe_text(corpus, max_steps=3, eval_every="null", checkpoint_every=3))
    train(load_recipe(path, ["train.batch_size=4"]), run_dir=tmp_path / "single", resume="never", show_progress=False)
    proc = _launched([*LAUNCHERS[launcher](free_port()), "train", str(path), "train.batch_size=2",
                      "--run-dir", str(tmp_path / "dp"), "-q"])
    assert proc.returncode == 0, proc.stderr
    latest = CheckpointDir(tmp_path / "dp" / "checkpoints").latest()
    assert json.loads((latest / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "dp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_plain_accelerate_launch_on_cpu_refuses_to_train_alone(corpus, write, tmp_path):
    """Without --multi_gpu, accelerate starts one process on a CPU machine although asked for two:
    moectl says so (its process exits with 2; accelerate then reports that exit status itself)
    instead of silently training one process."""
    path = write("r.yaml", train_recipe_text(corpus, max_steps=2))
    proc = _launched([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "moectl",
                      "train", str(path), "--run-dir", str(tmp_path / "run"), "-q"])
    assert proc.returncode != 0 and "returned non-zero exit status 2" in proc.stderr
    assert "started only one" in proc.stderr and "--multi_gpu" in proc.stderr
    package = str(Path(moectl.__file__).resolve().parent) + os.sep   # wherever the checkout lives
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith("File ")]
    assert frames and not any(package in line for line in frames)   # accelerate's traceback, not moectl's
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_three_processes_with_uneven_validation(corpus, write, tmp_path, parallel):
    """Two validation batches over three processes: the third has none, yet every process runs the
    same forwards and collectives (a sharded model would otherwise hang), and the run finishes."""
    path = write("r.yaml", train_recipe_text(corpus, max_steps=2, eval_every=1, checkpoint_every=2, eval_batches=2,
                                             batch_size=2, parallel=parallel))
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(path), "--nproc", "3", "--run-dir",
                           str(tmp_path / "run"), "-q"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = evals(tmp_path / "run")
    assert sorted(records) == [1, 2] and all(0 < v < 10 for v in records.values())


def test_a_process_whose_peers_never_come_says_so(corpus, write, tmp_path):
    """WORLD_SIZE=2 with no second process: a clear failure after the rendezvous timeout, not a hang."""
    from moectl.train.launch import free_port

    path = write("r.yaml", train_recipe_text(corpus, max_steps=2))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "MOECTL_RENDEZVOUS_TIMEOUT": "3"}
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(path), "--run-dir", str(tmp_path / "run"),
                           "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "process 0 of 2 could not join the others" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["closed pipe", "SIGHUP"])
def test_closed_output_or_terminal_stops_with_a_checkpoint(corpus, write, tmp_path, how):
    """`moectl train ... | head` and a closed terminal stop the run as Ctrl-C does: a checkpoint,
    a message on stderr and exit code 130."""
    path = write("r.yaml", train_recipe_text(corpus, max_steps=400, checkpoint_every=1000, eval_every=1000,
                                             warmup_steps=5))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moectl", "train", str(path), "--run-dir", str(run)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if how == "closed pipe":
        for _ in range(3):   # what `| head -3` reads before it exits
            assert proc.stdout.readline()
        proc.stdout.close()
        expected = "the output was closed at step"
    else:
        metrics = run / "logs" / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc)
        proc.send_signal(signal.SIGHUP)
        expected = "the terminal closed at step"
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert expected in err and "--resume auto" in err and "Traceback" not in err
    stopped = CheckpointDir(run / "checkpoints").latest()
    assert stopped is not None and 0 < load_run(stopped).step < 400


def _slurm_task(path, run, rank, job="4242", extra=None):
    """One task of an srun step with two tasks on one node (no torchrun: no WORLD_SIZE)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_ID": job, "OMP_NUM_THREADS": "1",
                **(extra or {})})
    return subprocess.Popen([sys.executable, "-m", "moectl", "train", str(path), "train.batch_size=2", "--run-dir",
                             str(run), "-q"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_an_srun_step_with_two_tasks_trains_as_one_run(corpus, write, tmp_path):
    """srun -n 2 moectl train ...: the two tasks find each other from SLURM's variables and train
    with world size 2 (neither trains alone, neither exits on the lock)."""
    from moectl.train.launch import free_port

    path = write("r.yaml", train_recipe_text(corpus, max_steps=3, eval_every="null", checkpoint_every=3))
    port = str(free_port())
    procs = [_slurm_task(path, tmp_path / "run", r, extra={"MASTER_PORT": port}) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    latest = CheckpointDir(tmp_path / "run" / "checkpoints").latest()
    assert json.loads((latest / "meta.json").read_text())["world_size"] == 2
    assert json.loads((latest / "meta.json").read_text())["provenance"]["launcher"] == "slurm"


def test_two_torchrun_agents_meet_through_c10d(corpus, write, tmp_path):
    """A two-node launch on one machine: two torchrun agents, one process each, a c10d rendezvous."""
    from moectl.train.launch import free_port

    path = write("r.yaml", train_recipe_text(corpus, max_steps=3, eval_every="null", checkpoint_every=3))
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "moectl-test",
                                "--node_rank", str(node), "-m", "moectl", "train", str(path), "train.batch_size=2",
                                "--run-dir", str(tmp_path / "run"), "-q"], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for a in agents:
        _, err = a.communicate(timeout=300)
        assert a.returncode == 0, err[-3000:]
    latest = CheckpointDir(tmp_path / "run" / "checkpoints").latest()
    assert json.loads((latest / "meta.json").read_text())["world_size"] == 2


def test_a_multi_node_srun_step_without_a_meeting_place_is_refused(corpus, write, tmp_path):
    path = write("r.yaml", train_recipe_text(corpus, max_steps=2))
    proc = _slurm_task(path, tmp_path / "run", 0, extra={"SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "[",
                                                        "SLURM_JOB_NODELIST": ""})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "MASTER_ADDR" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
