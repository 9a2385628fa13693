"""Runs you can trust: a run folder is keyed to its tokenizer and locked while it trains; a rerun
changes nothing; a changed budget or process count continues without a jump or a skipped window;
damaged or hostile checkpoints, names and paths are clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moectl.rundir import CheckpointDir
from tests.conftest import REPO, train_recipe_text
from tests.train.test_train import _Evil


@pytest.fixture
def recipe_path(corpus, write):
    def make(**train_settings):
        settings = dict(max_steps=4, eval_every="null", checkpoint_every=2)
        settings.update(train_settings)
        return write("train.yaml", train_recipe_text(corpus, **settings))
    return make


def snapshot(folder):
    """Every file under a folder: (size, mtime, content hash)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def lrs(run):
    return {r["step"]: r["lr"] for r in map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"}


# --------------------------------------------------------------------------- finished runs and budgets


@pytest.mark.train
def test_rerunning_a_finished_run_changes_nothing(cli, recipe_path, tmp_path):
    path, run = recipe_path(), tmp_path / "run"
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    before = snapshot(run)
    summary = json.loads((run / "logs" / "summary.json").read_text())
    assert isinstance(summary["final_val_loss"], float) and summary["final_val_loss"] == summary["final_val_loss"]
    r = cli("train", path, "--run-dir", run)
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output
    assert snapshot(run) == before
    assert "NaN" not in (run / "logs" / "summary.json").read_text()


@pytest.mark.train
def test_extending_a_run_continues_the_learning_rate(cli, recipe_path, tmp_path):
    """The rule (docs/training.md): from the resume step the schedule starts at the learning rate
    the run had reached and follows its shape over the new remaining steps."""
    run = tmp_path / "run"
    assert cli("train", recipe_path(max_steps=6, lr_schedule="wsd", decay_fraction=0.5), "--run-dir", run,
               "-q").exit_code == 0
    first = lrs(run)
    r = cli("train", recipe_path(max_steps=12, lr_schedule="wsd", decay_fraction=0.5), "--run-dir", run)
    assert r.exit_code == 0 and "the budget changed (6 -> 12 steps)" in r.output, r.output
    after = lrs(run)
    assert all(after[s] == first[s] for s in first)      # the history is kept
    floor = 1e-3 * 0.1
    assert after[6] == pytest.approx(floor)
    assert all(after[s] == pytest.approx(floor) for s in range(7, 13))   # no jump back to the peak
    # cosine, raised before it finished: continuous at the resume step, then decaying to the floor
    run2 = tmp_path / "run2"
    from moectl.recipe.load import load_recipe
    from moectl.train.optim import Schedule

    cfg = load_recipe(recipe_path(max_steps=12)).train
    resumed = Schedule.fresh(8).resumed(4, 12, cfg)
    values = [resumed.lr(s, cfg) for s in range(12)]
    assert values[:4] == [Schedule.fresh(8).lr(s, cfg) for s in range(4)]
    assert values[4] == pytest.approx(Schedule.fresh(8).lr(4, cfg))
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False)) and values[-1] == pytest.approx(floor)
    assert cli("train", recipe_path(max_steps=4), "--run-dir", run2, "-q").exit_code == 0


def test_the_data_order_depends_on_the_global_batch_only():
    from moectl.data.loader import TrainOrder

    def step_set(batch, accum, world, step):
        orders = [TrainOrder(100, 3, batch, accum, world, r) for r in range(world)]
        return sorted(i for o in orders for m in range(accum) for i in o.indices(step, m))

    for step in range(30):
        assert step_set(4, 2, 1, step) == step_set(4, 1, 2, step) == step_set(2, 2, 2, step)


@pytest.mark.processes
@pytest.mark.train
@pytest.mark.slow
def test_another_process_count_keeps_the_global_batch(recipe_path, tmp_path):
    path, run = recipe_path(max_steps=2, batch_size=2, grad_accum=2), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "moectl", "train", str(path), "--run-dir", str(run)]
    assert subprocess.run([*cmd, "-q"], env=env, capture_output=True, timeout=300).returncode == 0
    r = subprocess.run([*cmd, "train.max_steps=4", "--nproc", "3"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "global batch of 4 sequences" in r.stderr and "--nproc 1" in r.stderr, r.stderr
    r = subprocess.run([*cmd, "train.max_steps=4", "--nproc", "2"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train.grad_accum = 1 with 2 processes" in r.stdout
    state = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert state["global_batch"] == 4 and state["grad_accum"] == 1 and state["world_size"] == 2


# --------------------------------------------------------------------------- tokenizer and lock


@pytest.mark.train
def test_the_tokenizer_of_a_run_is_never_replaced(cli, corpus, write, tmp_path):
    run = tmp_path / "run"
    changed = tmp_path / "more"
    changed.mkdir()
    for p in corpus.iterdir():
        (changed / p.name).write_text(p.read_text())
    path = write("a.yaml", train_recipe_text(changed, max_steps=2, eval_every="null"))
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    tokenizer = (run / "tokenizer.json").read_bytes()
    (changed / "extra.txt").write_text("zebra quokka " * 5000)      # the corpus changes under the run
    r = cli("train", path, "train.max_steps=4", "--run-dir", run, "-q")
    assert r.exit_code == 2 and "is not the tokenizer of this run" in r.output, r.output
    assert (run / "tokenizer.json").read_bytes() == tokenizer
    # --resume PATH and init_from from that run, with the changed corpus: refused the same way
    r = cli("train", path, "--run-dir", tmp_path / "other", "--resume", run, "-q")
    assert r.exit_code == 2 and "is not the tokenizer of the run of --resume" in r.output, r.output
    r = cli("train", path, f"train.init_from={run}", "--run-dir", tmp_path / "init", "-q")
    assert r.exit_code == 2 and "is not the tokenizer of train.init_from" in r.output, r.output


@pytest.mark.train
def test_init_from_takes_build_save_and_another_run(cli, recipe_path, tmp_path):
    path = recipe_path(max_steps=2)
    assert cli("build", path, "--save", tmp_path / "init").exit_code == 0
    r = cli("train", path, f"train.init_from={tmp_path / 'init'}", "--run-dir", tmp_path / "a")
    assert r.exit_code == 0 and "starting from the weights of" in r.output, r.output
    r = cli("train", path, f"train.init_from={tmp_path / 'a'}", "--run-dir", tmp_path / "b", "-q")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "checkpoints" / "step-00000002" / "model.safetensors")
    init = load_file(tmp_path / "init" / "model.safetensors")
    assert not torch.equal(a["embed.weight"], init["embed.weight"])   # it trained from there


@pytest.mark.processes
@pytest.mark.train
def test_a_run_folder_is_locked_while_it_trains(cli, recipe_path, tmp_path):
    from moectl.train.lock import RunLock

    path, run = recipe_path(max_steps=2), tmp_path / "run"
    lock = RunLock(run).acquire()
    try:
        r = cli("train", path, "--run-dir", run, "-q")
        assert r.exit_code == 2 and "is being trained by another process (pid" in r.output, r.output
    finally:
        lock.release()
    # a lock left by a killed process is stale and taken over
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from moectl.train.lock import RunLock; RunLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(60)", str(REPO), str(run)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    r = cli("train", path, "--run-dir", run, "-q")
    assert r.exit_code == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = cli("train", path, "--run-dir", run, "-q")
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- hostile checkpoints


@pytest.mark.train
@pytest.mark.parametrize("target", ["optimizer.pt", "rng/rank-0.pt", "plan.pt"])
def test_crafted_files_never_run_from_elsewhere_or_init_from(cli, recipe_path, tmp_path, target):
    """--resume PATH from another run and init_from never execute a checkpoint's pickles either."""
    path = recipe_path(max_steps=2)
    extra = ["model.moe.competition.rate=0.5", "model.moe.competition.warmup=0.0"]
    src = tmp_path / "src"
    assert cli("train", path, *extra, "--run-dir", src, "-q").exit_code == 0
    ckpt = CheckpointDir(src / "checkpoints").latest()
    marker = tmp_path / "code-ran"
    torch.save({"state": _Evil(marker)}, ckpt / target)
    r = cli("train", path, *extra, "train.max_steps=4", "--run-dir", tmp_path / "b", "--resume", ckpt, "-q")
    assert r.exit_code == 2 and "cannot be read safely" in r.output and target.split("/")[-1] in r.output, r.output
    # init_from reads model.safetensors alone: the crafted file is never opened
    r = cli("train", path, *extra, f"train.init_from={ckpt}", "--run-dir", tmp_path / "c", "-q")
    assert r.exit_code == 0, r.output
    assert not marker.exists()


def _corrupt(kind):
    def empty(p):
        p.write_bytes(b"")

    def truncate(p):
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])

    def garbage(p):
        p.write_bytes(os.urandom(256))

    def delete(p):
        p.unlink()

    def wrong_json(p):
        p.write_text("[1, 2, 3]")

    damage = {"empty": empty, "truncated": truncate, "garbage": garbage, "missing": delete, "wrong json": wrong_json}
    return damage[kind]


DAMAGE = [(f, k) for f in ("model.safetensors", "optimizer.pt", "rng/rank-0.pt") for k in
          ("empty", "truncated", "garbage")] + [("trainer.json", k) for k in ("empty", "garbage", "wrong json",
                                                                             "missing")] + [
    ("model.safetensors", "missing"), ("optimizer.pt", "missing")]


@pytest.mark.train
@pytest.mark.parametrize("file,kind", DAMAGE, ids=[f"{f}-{k}" for f, k in DAMAGE])
def test_a_damaged_checkpoint_names_the_older_intact_one(cli, recipe_path, tmp_path, file, kind):
    path, run = recipe_path(), tmp_path / "run"
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    latest = CheckpointDir(run / "checkpoints").latest()
    assert latest.name == "step-00000004"
    _corrupt(kind)(latest / file)
    r = cli("train", path, "train.max_steps=6", "--run-dir", run, "-q")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "step-00000002" in r.output, r.output
    assert "--resume" in r.output


@pytest.mark.train
@pytest.mark.parametrize("content", ["", "garbage\x00\xff", "step-00000099", "../../etc", "step-00000004\nmore"])
def test_a_bad_latest_file_names_a_complete_checkpoint(cli, recipe_path, tmp_path, content):
    path, run = recipe_path(), tmp_path / "run"
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    (run / "checkpoints" / "latest").write_bytes(content.encode("utf-8", "surrogateescape"))
    r = cli("train", path, "train.max_steps=6", "--run-dir", run, "-q")
    if content.startswith("step-00000004"):
        assert r.exit_code == 2 or r.exit_code == 0
        return
    assert r.exit_code == 2 and "step-00000004" in r.output and "Traceback" not in r.output, r.output


# --------------------------------------------------------------------------- names, quiet, notes, stops


def test_a_recipe_that_extends_without_a_name_gets_its_own_run(write, recipe_path, tmp_path):
    from moectl.recipe.load import load_recipe

    base = recipe_path()
    child = write("lr-ablation.yaml", f"extends: {base.name}\ntrain:\n  lr: 3.0e-4\n")
    assert load_recipe(child).name == "lr-ablation"
    named = write("named.yaml", f"extends: {base.name}\nname: mine\n")
    assert load_recipe(named).name == "mine"


@pytest.mark.parametrize("name", ["../escape", "", "a/b", ".hidden", "x" * 200, "with space"])
def test_run_names_cannot_escape_runs(cli, recipe_path, name):
    r = cli("train", recipe_path(), f"name={name!r}" if name else "name=''", "-q")
    assert r.exit_code == 2 and "cannot name a run folder" in r.output, r.output


@pytest.mark.train
def test_quiet_prints_nothing_on_success(cli, recipe_path, tmp_path):
    r = cli("train", recipe_path(max_steps=2), "--run-dir", tmp_path / "run", "-q")
    assert r.exit_code == 0 and r.output == "", r.output


@pytest.mark.train
def test_non_causal_routers_are_said_to_be_so(cli, recipe_path, tmp_path):
    r = cli("train", recipe_path(max_steps=1), "model.moe.router.kind=expert_choice", "--run-dir", tmp_path / "r")
    assert r.exit_code == 0 and "router is not causal" in r.output, r.output
    r = cli("build", recipe_path(max_steps=1), "model.moe.router.kind=expert_choice")
    assert "not causal" in r.output


def test_interrupted_exit_codes(tmp_path, capsys):
    import typer

    from moectl.cli.train import _interrupted
    from moectl.train.trainer import Interrupted

    with pytest.raises(typer.Exit) as e:
        _interrupted(tmp_path / "nothing")
    assert e.value.exit_code == 1 and "nothing to resume" in capsys.readouterr().err
    assert Interrupted("interrupted at step 3", hint="continue").render().startswith("stopped: ")


# --------------------------------------------------------------------------- paths and full disks


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs (skipped where this machine cannot mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()[:100]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.processes
@pytest.mark.train
def test_a_full_disk_is_a_message(cli, recipe_path, tiny_disk, tmp_path):
    path = recipe_path(max_steps=2)
    r = cli("train", path, "--run-dir", tiny_disk / "run", "-q")
    assert r.exit_code == 2 and "no space left on the device" in r.output and "Traceback" not in r.output, r.output
    leftovers = [p.name for p in tiny_disk.rglob("*") if ".tmp-" in p.name]
    assert not leftovers
    assert not (tiny_disk / "run" / "checkpoints" / "latest").exists()
    r = cli("train", path, f"data.cache_dir={tiny_disk / 'cache'}", "--run-dir", tmp_path / "run2", "-q")
    assert r.exit_code == 2 and "no space left" in r.output and "Traceback" not in r.output, r.output
    assert not [p for p in tiny_disk.rglob("*") if ".tmp-" in p.name]
    try:   # the disk is (nearly) full by now; make sure
        (tiny_disk / "fill").write_bytes(b"x" * (200 * 1024))
    except OSError:
        pass
    r = cli("recipes", "schema", "-o", tiny_disk / "schema.json")
    assert r.exit_code == 2 and "no space left" in r.output, r.output
    assert not (tiny_disk / "schema.json").exists() and not list(tiny_disk.glob(".schema.json.tmp-*"))


@pytest.mark.parametrize("args", [
    ("train", "{recipe}", "--run-dir", "/proc/nope/run", "-q"),
    ("train", "{recipe}", "--run-dir", "{file}/run", "-q"),
    ("train", "{recipe}", "data.cache_dir=/proc/nope", "--run-dir", "{tmp}/r", "-q"),
    ("train", "{recipe}", "data.cache_dir={file}", "--run-dir", "{tmp}/r", "-q"),
    ("recipes", "schema", "-o", "/proc/nope/schema.json"),
    ("recipes", "schema", "-o", "{file}/schema.json"),
    ("build", "{recipe}", "--save", "/proc/nope/init"),
    ("build", "{recipe}", "--save", "{file}/init"),
])
def test_impossible_paths_are_messages(cli, recipe_path, tmp_path, args):
    file = tmp_path / "a-file"
    file.write_text("x")
    recipe = recipe_path(max_steps=1)
    r = cli(*[a.format(recipe=recipe, file=file, tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and ("cannot" in r.output or "not a directory" in r.output.lower()), r.output


@pytest.mark.processes
@pytest.mark.train
def test_stale_temporaries_are_cleaned(tmp_path):
    from moectl.fsutil import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket

    stale = tmp_path / f".shard.tmp-{dead}@{socket.gethostname()}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    elsewhere = tmp_path / f".shard.tmp-{dead}@another-host"   # a shared cache: not ours to judge
    elsewhere.mkdir()
    with atomic_dir(tmp_path / "shard") as tmp:
        (tmp / "done").write_text("ok")
    assert not stale.exists() and (tmp_path / "shard" / "done").is_file()
    assert elsewhere.exists()
    time.sleep(0)


def test_a_budget_change_in_warmup_still_reaches_the_peak(recipe_path):
    from moectl.recipe.load import load_recipe
    from moectl.train.optim import Schedule

    cfg = load_recipe(recipe_path(max_steps=200, warmup_steps=100)).train
    resumed = Schedule.fresh(100 + 50).resumed(50, 200, cfg)
    assert resumed.lr(99, cfg) == pytest.approx(cfg.lr)
    assert Schedule.from_state([], 10).segments   # an empty saved list falls back to a fresh schedule


def test_a_single_long_line_is_split_near_the_share():
    from moectl.data.prepare import split_single
    from moectl.data.sources import Document

    text = "title\n" + "x" * 10_000
    (_, train), (_, val) = split_single(Document(text, "input.txt"), 0.1)
    assert abs(len(val.text) / len(text) - 0.1) < 0.01


def test_derived_names_are_made_valid(write, recipe_path):
    from moectl.recipe.load import load_recipe

    base = recipe_path()
    child = write("exp 1.yaml", f"extends: {base.name}\n")
    assert load_recipe(child).name == "exp-1"
    underscore = write("_base.yaml", f"extends: {base.name}\n")
    assert load_recipe(underscore).name == "base"


def test_override_order_keeps_options():
    from moectl.recipe.load import load_recipe

    a = load_recipe("quickstart", ["model.moe.router.p=0.6", "model.moe.router.kind=topp"])
    b = load_recipe("quickstart", ["model.moe.router.kind=topp", "model.moe.router.p=0.6"])
    assert a.model.moe.router.p == b.model.moe.router.p == 0.6


@pytest.mark.train
def test_a_checkpoint_missing_a_tensor_is_refused(cli, recipe_path, tmp_path):
    from safetensors.torch import load_file, save_file

    path, run = recipe_path(), tmp_path / "run"
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    file = CheckpointDir(run / "checkpoints").latest() / "model.safetensors"
    state = load_file(file)
    state.pop("layers.1.attn.wq.weight")
    save_file(state, str(file))
    r = cli("train", path, "train.max_steps=6", "--run-dir", run, "-q")
    assert r.exit_code == 2 and "missing: layers.1.attn.wq.weight" in r.output and "step-00000002" in r.output, r.output


@pytest.mark.train
def test_a_run_from_before_a_new_key_resumes(cli, recipe_path, tmp_path):
    """Keys a newer moectl adds (with defaults) are not differences; real ones are named."""
    import yaml

    path, run = recipe_path(max_steps=2), tmp_path / "run"
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("qk_norm", "attention_bias", "head_dim", "qkv_clip"):
        cfg["model"].pop(key)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", path, "train.max_steps=3", "--run-dir", run, "-q")
    assert r.exit_code == 0, r.output
    r = cli("train", path, "train.max_steps=4", "model.moe.top_k=1", "--run-dir", run, "-q")
    assert r.exit_code == 2 and "model.moe.top_k: 2 in the run, 1 now" in r.output, r.output


@pytest.mark.train
def test_a_metrics_log_is_read_with_one_rule_on_resume(cli, recipe_path, tmp_path):
    """Resuming cuts the log back to the checkpoint: a last line cut short by a killed writer is left
    out; a damaged line before it stops the resume (exit 2) naming the line, and nothing is trained."""
    path, run = recipe_path(max_steps=4, checkpoint_every=2, log_every=1), tmp_path / "run"
    assert cli("train", path, "train.max_steps=2", "--run-dir", run, "-q").exit_code == 0
    log = run / "logs" / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"type": "train", "step": 3, "lo')            # a torn last line
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train"' in line]
    assert steps == [1, 2, 3, 4]
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    before = snapshot(run / "checkpoints")
    again = cli("train", path, "train.max_steps=6", "--run-dir", run, "-q")
    assert again.exit_code == 2 and "metrics.jsonl is damaged (line 2 is not JSON)" in again.stderr
    assert "remove the damaged line" in again.stderr and "Traceback" not in again.output
    assert snapshot(run / "checkpoints") == before
