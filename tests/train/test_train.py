"""Training in-process: the run folder, exact resume, budgets, non-finite losses, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moectl.recipe.load import load_recipe
from moectl.rundir import CheckpointDir
from moectl.runs import load_run
from moectl.train.trainer import train
from tests.conftest import train_recipe_text
from tests.train.helpers import evals, losses


@pytest.fixture
def recipe_path(corpus, write):
    def make(**train_settings):
        return write("train.yaml", train_recipe_text(corpus, **train_settings))
    return make


@pytest.mark.train
def test_run_folder_and_metrics(cli, recipe_path, tmp_path):
    run = tmp_path / "run"
    result = cli("train", recipe_path(), "--run-dir", run, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml", "data.json", "logs",
                                                     "tokenizer.json"]
    ckpts = CheckpointDir(run / "checkpoints")
    assert ckpts.latest().name == "step-00000006"
    assert [p.name for p in ckpts.steps()] == ["step-00000003", "step-00000006"]
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    first = train_recs[0]
    for key in ("loss", "lr", "tokens_per_s", "mfu", "aux_loss", "load_balance", "z_loss", "imbalance_max",
                "grad_norm"):
        assert key in first, key
    layer = first["layers"]["L0"]
    assert sum(layer["load"]) == 4 * 32 * 2 and layer["imbalance"] >= 1 and "cv" in layer and "dead" in layer
    assert sorted(evals(run)) == [3, 6]
    eval_rec = next(r for r in records if r["type"] == "eval")   # how the validation tokens were routed
    assert sum(eval_rec["layers"]["L0"]["load"]) == 2 * 4 * 32 * 2 and "load_balance" in eval_rec
    summary = json.loads((run / "logs" / "summary.json").read_text())
    assert summary["tokens"] == 6 * 4 * 32 and summary["final_val_loss"] == evals(run)[6]
    # The run folder loads back as a model (at its latest checkpoint).
    loaded = load_run(run)
    assert loaded.step == 6 and loaded.checkpoint == ckpts.latest()
    assert torch.isfinite(next(loaded.model.parameters())).all()


@pytest.mark.train
def test_summary_compares_with_unigram_entropy(cli, recipe_path, tmp_path):
    """Without --quiet the run ends with a summary: final validation loss beside the validation
    tokens' unigram entropy, and the difference."""
    run = tmp_path / "run"
    result = cli("train", recipe_path(max_steps=2, eval_every="null"), "--run-dir", run)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "logs" / "summary.json").read_text())
    assert 0 < summary["val_unigram_entropy"] < 7 and summary["final_val_loss"] > 0
    out = " ".join(result.output.replace("│", " ").split())   # the table's text, without its borders
    assert f"final validation loss {summary['final_val_loss']:.4f} nats" in out
    assert f"validation tokens {summary['val_tokens']:,}" in out and summary["val_tokens"] > 0
    assert f"step 2: validation loss {summary['final_val_loss']:.4f} ({summary['val_tokens']:,} tokens)" in out
    assert f"validation unigram entropy {summary['val_unigram_entropy']:.4f} nats" in out
    gap = summary["val_unigram_entropy"] - summary["final_val_loss"]
    assert f"{'below' if gap >= 0 else 'above'} unigram entropy {abs(gap):.4f} nats" in out
    assert "entropy -" not in out   # never a negative distance


@pytest.mark.train
def test_keep_last(cli, recipe_path, tmp_path):
    run = tmp_path / "run"
    path = recipe_path(max_steps=8, checkpoint_every=2, keep_last=2)
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    assert [p.name for p in CheckpointDir(run / "checkpoints").steps()] == ["step-00000006", "step-00000008"]


@pytest.mark.train
def test_resume_is_exact(recipe_path, tmp_path):
    """2N steps straight equal N steps, resume, N steps: identical per-step losses and validation,
    with routing jitter and aux-loss-free biases (RNG and router state restored)."""
    overrides = ["train.lr_schedule=constant", "train.warmup_steps=2", "model.moe.router.jitter_eps=0.1",
                 "model.moe.router.bias_update_rate=0.01", "train.eval_every=4", "train.checkpoint_every=4"]
    path = recipe_path()
    straight = load_recipe(path, [*overrides, "train.max_steps=8"])
    train(straight, run_dir=tmp_path / "a", resume="never", show_progress=False)
    train(load_recipe(path, [*overrides, "train.max_steps=4"]), run_dir=tmp_path / "b", resume="never",
          show_progress=False)
    train(straight, run_dir=tmp_path / "b", resume="auto", show_progress=False)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == list(b) == list(range(1, 9))
    assert a == b                      # bitwise equal, not merely close
    assert evals(tmp_path / "a") == evals(tmp_path / "b")
    sa = torch.load(tmp_path / "a/checkpoints/step-00000008/optimizer.pt", weights_only=True)
    sb = torch.load(tmp_path / "b/checkpoints/step-00000008/optimizer.pt", weights_only=True)
    for name, st in sa["state"].items():
        assert torch.equal(st["exp_avg"], sb["state"][name]["exp_avg"]), name


@pytest.mark.train
def test_resume_refuses_other_model(cli, recipe_path, tmp_path):
    run = tmp_path / "run"
    path = recipe_path(max_steps=3)
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    result = cli("train", path, "model.d_model=64", "--run-dir", run, "-q")
    assert result.exit_code == 2 and "model: differs" in result.stderr
    result = cli("train", path, "--run-dir", run, "--resume", "never", "-q")
    assert result.exit_code == 2 and "already holds checkpoints" in result.stderr
    result = cli("train", path, "--run-dir", run, "--resume", tmp_path / "nothing", "-q")
    assert result.exit_code == 2 and "no complete checkpoint" in result.stderr
    # Finished runs resume as a no-op; a longer budget continues.
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    assert cli("train", path, "train.max_steps=5", "--run-dir", run, "-q").exit_code == 0
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]


@pytest.mark.train
def test_resume_from_another_models_checkpoint(cli, recipe_path, tmp_path):
    """--resume PATH from a run of a different model: a clear error (exit 2), not a traceback, and
    the new run folder is not created."""
    path = recipe_path(max_steps=2, eval_every="null")
    assert cli("train", path, "--run-dir", tmp_path / "a", "-q").exit_code == 0
    result = cli("train", path, "model.d_model=64", "--run-dir", tmp_path / "b", "-q",
                 "--resume", tmp_path / "a" / "checkpoints" / "step-00000002")
    assert result.exit_code == 2 and "model: differs" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
    # Without the source run's config.yaml, loading the weights itself reports the mismatch.
    (tmp_path / "a" / "config.yaml").unlink()
    result = cli("train", path, "model.d_model=64", "--run-dir", tmp_path / "c", "-q",
                 "--resume", tmp_path / "a" / "checkpoints" / "step-00000002")
    assert result.exit_code == 2 and "does not match the recipe's model" in result.stderr, result.output
    assert "Traceback" not in result.output


@pytest.mark.train
def test_resume_from_older_checkpoint_rewrites_history(recipe_path, tmp_path):
    """Resuming a run from an older checkpoint of its own: the log keeps each step once (the later
    steps of the abandoned attempt are dropped), and replacing a checkpoint of the same step never
    leaves `latest` naming a missing folder."""
    path = recipe_path(max_steps=6, checkpoint_every=3, eval_every=3, keep_last=5)
    run = tmp_path / "run"
    train(load_recipe(path), run_dir=run, resume="never", show_progress=False)
    ckpts = CheckpointDir(run / "checkpoints")
    ckpts.release(ckpts.step_dir(3))                    # latest names step 6: nothing to do
    assert ckpts.latest().name == "step-00000006"
    ckpts.release(ckpts.step_dir(6))                    # about to replace step 6: latest moves back
    assert ckpts.latest().name == "step-00000003"
    (ckpts.root / "latest").write_text("step-00000006\n")
    train(load_recipe(path, ["train.lr=1.0e-3"]), run_dir=run, resume=str(ckpts.step_dir(3)), show_progress=False)
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6] and sorted(evals(run)) == [3, 6]   # each step once
    assert ckpts.latest().name == "step-00000006"


@pytest.mark.train
def test_token_budget(cli, recipe_path, tmp_path):
    run = tmp_path / "run"
    assert cli("train", recipe_path(max_steps="null", max_tokens=500), "--run-dir", run, "-q").exit_code == 0
    assert max(losses(run)) == 4   # ceil(500 / (4 sequences * 32 tokens))


def test_no_budget_is_a_recipe_error(cli, recipe_path, tmp_path):
    result = cli("train", recipe_path(max_steps="null"), "--run-dir", tmp_path / "r", "-q")
    assert result.exit_code == 2 and "train.max_steps" in result.stderr


@pytest.mark.train
def test_nonfinite_stops_and_keeps_last_good(cli, recipe_path, tmp_path):
    run = tmp_path / "run"
    path = recipe_path(max_steps=4, checkpoint_every=2, grad_clip=0, eval_every="null")
    assert cli("train", path, "--run-dir", run, "-q").exit_code == 0
    # Continue with an absurd learning rate: the loss blows up after step 4.
    result = cli("train", path, "train.max_steps=40", "train.lr=1.0e+8", "train.lr_schedule=constant",
                 "--run-dir", run, "-q")
    assert result.exit_code == 1, result.output
    assert "non-finite loss or gradient norm at step" in result.stderr and "Traceback" not in result.output
    bad_step = int(result.stderr.split("gradient norm at step ")[1].split()[0])
    assert bad_step > 4
    latest = CheckpointDir(run / "checkpoints").latest()
    assert latest.name == f"step-{bad_step - bad_step % 2 if bad_step % 2 else bad_step - 2:08d}"
    loaded = load_run(latest)
    assert loaded.step < bad_step
    for p in loaded.model.parameters():   # the checkpoint's weights, as loaded
        assert torch.isfinite(p).all()


@pytest.mark.train
def test_nonfinite_skip(recipe_path, tmp_path, monkeypatch):
    """on_nonfinite: skip drops the bad step (no update) and the run goes on to the end."""
    import moectl.train.parallel as parallel

    real, calls = parallel.clip_gradients, []

    def clip(model, max_norm):   # the gradient norm of the 3rd step is NaN
        calls.append(1)
        norm = real(model, max_norm)
        return norm * float("nan") if len(calls) == 3 else norm

    monkeypatch.setattr(parallel, "clip_gradients", clip)
    path = recipe_path(max_steps=5, on_nonfinite="skip", eval_every="null", checkpoint_every=5)
    result = train(load_recipe(path), run_dir=tmp_path / "run", resume="never", show_progress=False)
    assert result.skipped_steps == 1 and result.steps == 5
    def strict(token):   # JSON has no NaN: moectl writes non-finite numbers as null
        raise AssertionError(f"{token} in metrics.jsonl")

    lines = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x, parse_constant=strict) for x in lines]
    assert [(r["step"], r["grad_norm"]) for r in records if r["type"] == "nonfinite"] == [(3, None)]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]


@pytest.mark.train
def test_nonfinite_skip_gives_up(cli, recipe_path, tmp_path):
    """A run whose every step is non-finite stops after 20 skips in a row instead of spinning."""
    path = recipe_path(max_steps=30, grad_clip=0, on_nonfinite="skip", eval_every="null")
    result = cli("train", path, "train.lr=1.0e+8", "train.lr_schedule=constant", "--run-dir", tmp_path / "run", "-q")
    assert result.exit_code == 1 and "consecutive non-finite steps" in result.stderr
    skipped = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["type"] == "nonfinite"]
    assert len(skipped) == 21


@pytest.mark.parametrize("make_source, message", [
    (lambda d: f"['{d}/missing/*.txt']", "no file matches"),
    (lambda d: _write(d / "empty.txt", ""), "the corpus is empty"),
    (lambda d: _write(d / "bad.jsonl", '{"text": "a"}\nnot json\n'), "bad.jsonl:2: not valid JSON"),
    (lambda d: _write(d / "nofield.jsonl", '{"body": "a"}\n'), "nofield.jsonl:1: no 'text' field"),
])
def test_bad_data_input(cli, recipe_path, tmp_path, make_source, message):
    paths = make_source(tmp_path)
    run = tmp_path / "run"
    result = cli("train", recipe_path(), f"data.source.paths={paths}", f"data.cache_dir={tmp_path / 'cache'}",
                 "--run-dir", run, "-q")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not run.exists()   # nothing half-written
    cache = tmp_path / "cache"
    assert not (cache / "tokens").exists() or not list((cache / "tokens").iterdir())


def _write(path, text):
    path.write_text(text)
    return f"['{path}']"


@pytest.mark.train
def test_activation_checkpointing_trains_the_same(recipe_path, tmp_path):
    path = recipe_path(max_steps=3, eval_every="null")
    train(load_recipe(path), run_dir=tmp_path / "a", resume="never", show_progress=False)
    train(load_recipe(path, ["train.activation_checkpointing=true"]), run_dir=tmp_path / "b", resume="never",
          show_progress=False)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5


@pytest.mark.train
def test_tensorboard(recipe_path, tmp_path):
    pytest.importorskip("tensorboard")
    path = recipe_path(max_steps=2, eval_every="null", tensorboard="true")
    train(load_recipe(path), run_dir=tmp_path / "a", resume="never", show_progress=False)
    events = list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/imbalance/L0", "train/diversity/L1", "train/entropy/L0", "train/topk_mass/L0",
                "train/dead/L0", "train/diversity_min"):
        assert tag in tags, tag


@pytest.mark.train
def test_cheap_routing_measures_are_logged(recipe_path, tmp_path):
    train(load_recipe(recipe_path(max_steps=2, eval_every=2)), run_dir=tmp_path / "a", resume="never",
          show_progress=False)
    records = [json.loads(x) for x in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        for layer in rec["layers"].values():
            assert 0 < layer["diversity"] <= 1 and 0 < layer["topk_mass"] <= 1
            share = [x / sum(layer["load"]) for x in layer["load"]]
            expected = math.exp(-sum(p * math.log(p) for p in share if p > 0)) / len(share)
            assert layer["diversity"] == pytest.approx(expected)
        assert rec["diversity_min"] == min(v["diversity"] for v in rec["layers"].values())


class _Evil:
    """Unpickling this would create a folder: what a crafted checkpoint file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


@pytest.mark.train
@pytest.mark.parametrize("target", ["optimizer.pt", "rng/rank-0.pt", "plan.pt"])
def test_crafted_checkpoint_files_never_run(cli, recipe_path, tmp_path, target):
    """A pickle with code in it, in any .pt file of a checkpoint, is refused (exit 2) and never
    executed: every .pt file is read with weights_only=True."""
    path = recipe_path(max_steps=2, eval_every="null")
    extra = ["model.moe.competition.rate=0.5", "model.moe.competition.warmup=0.0"]   # so there is a plan.pt
    run = tmp_path / "run"
    assert cli("train", path, *extra, "--run-dir", run, "-q").exit_code == 0
    ckpt = CheckpointDir(run / "checkpoints").latest()
    assert (ckpt / "plan.pt").is_file()
    marker = tmp_path / "code-ran"
    torch.save({"state": _Evil(marker)}, ckpt / target)
    result = cli("train", path, *extra, "train.max_steps=4", "--run-dir", run, "-q")
    assert result.exit_code == 2, result.output
    assert "cannot be read safely" in result.stderr and "Traceback" not in result.output
    assert not marker.exists()
