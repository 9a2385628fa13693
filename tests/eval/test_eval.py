"""`moectl eval` end to end on a tiny trained run."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from moectl.data.loader import PackedSequences
from moectl.data.prepare import prepare_data
from moectl.runs import load_run
from tests.conftest import train_run

BATCHES = 6


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory, cli_module):
    out = tmp_path_factory.mktemp("eval-out")
    r = cli_module("eval", trained_run, "--out", out, "--no-plots", "-q", "--batches", str(BATCHES))
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from moectl.cli.app import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def test_perplexity_and_bits_per_byte_match_a_direct_computation(evaluated, trained_run):
    results, _ = evaluated
    run = load_run(trained_run)
    tokens = prepare_data(run.recipe, show_progress=False, log=lambda m: None).tokens("val")
    seqs = PackedSequences(tokens, run.recipe.model.seq_len)
    n = min(len(seqs), BATCHES * run.recipe.train.batch_size)
    assert n < len(seqs)           # --batches did limit the evaluation
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x, y = seqs.batch([i])
            logp = F.log_softmax(run.model(x).logits.double(), -1)
            nll -= logp.gather(-1, y[..., None]).sum().item()
            count += y.numel()
    assert results["tokens_evaluated"] == count
    assert results["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # every target token's text, decoded as one string (targets of consecutive windows are contiguous)
    targets = [int(t) for t in tokens[1:n * seqs.seq_len + 1]]
    nbytes = len(run.tokenizer.inner.decode(targets, skip_special_tokens=True).encode("utf-8"))
    assert results["bytes"] == nbytes
    assert results["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)


def test_same_numbers_as_the_training_run_validation(trained_run, tmp_path, cli_module):
    """Over the sequences training validated on (its first train.eval_batches batches), eval's loss
    is the final validation loss of the run, to the last bit: the same validation code."""
    summary = json.loads((trained_run / "logs" / "summary.json").read_text())
    r = cli_module("eval", trained_run, "--batches", "2", "--json", "--no-robustness", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loss"] == summary["final_val_loss"]
    # each says over how many tokens: the same ones here, fewer than the whole split that plain eval takes
    assert json.loads(r.stdout)["tokens_evaluated"] == summary["val_tokens"] < summary["val_split_tokens"]
    whole = cli_module("eval", trained_run, "--json", "--no-robustness", "--out", tmp_path / "whole")
    assert json.loads(whole.stdout)["tokens_evaluated"] == summary["val_split_tokens"]


def test_report_holds_every_section(evaluated):
    results, _ = evaluated
    assert results["format"] == "moectl.eval" and results["version"] == 2
    assert results["data"]["split"] == "val"
    routing = results["routing"]
    assert routing["layer_order"] == ["L0", "L1"]
    layer = routing["layers"]["L0"]
    for key in ("tokens_per_expert", "imbalance", "cv", "utilisation", "dead_fraction", "diversity", "entropy",
                "entropy_hist", "topk_mass", "co_selection", "inner_balance", "outer_balance", "logit_std",
                "preferred_tokens"):
        assert layer[key] is not None, key
    assert sum(layer["tokens_per_expert"]) == results["tokens_evaluated"] * 2     # top-2
    assert len(routing["mutual_information"]["top1"]) == 2
    rob = results["robustness"]
    assert rob["defined"] and rob["loss"] > 0 and rob["perplexity"] == pytest.approx(math.exp(rob["loss"]))


def test_json_output_and_the_tables(trained_run, tmp_path, cli_module):
    r = cli_module("eval", trained_run, "--out", tmp_path, "--json", "--no-robustness", "--batches", "1")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["robustness"] is None and data["sequences"] == 4      # one batch of train.batch_size
    r = cli_module("eval", trained_run, "--out", tmp_path, "--no-plots", "--batches", "1")
    assert r.exit_code == 0
    for text in ("bits/byte", "top-1 expert dropped", "expert load per layer", "tokens each expert prefers"):
        assert text in r.stdout


def test_other_data_and_dtype(trained_run, tmp_path, cli_module, corpus):
    out = tmp_path / "out"
    r = cli_module("eval", trained_run, "--data", corpus / "doc03.txt", "--dtype", "bfloat16", "--out", out,
                   "--batches", "2",
                   "--no-plots", "-q", "--no-robustness")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["split"] == "all" and res["dtype"] == "bfloat16"
    assert res["tokens_evaluated"] > 0 and math.isfinite(res["loss"])


def test_a_folder_of_text_with_odd_names(trained_run, tmp_path, cli_module, corpus):
    folder = tmp_path / "my data [v2]"
    (folder / "sub dir").mkdir(parents=True)
    shutil.copy(corpus / "doc01.txt", folder / "sub dir" / "a [1] b.txt")
    shutil.copy(corpus / "doc02.txt", folder / "c.txt")
    (folder / "ignored.bin").write_bytes(b"\0\1")
    out = tmp_path / "out"
    r = cli_module("eval", trained_run, "--data", folder, "--out", out, "--batches", "2", "--no-plots", "-q",
                   "--no-robustness")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["tokens"] > 1000 and res["data"]["split"] == "all"


@pytest.mark.parametrize("case", ["not-a-run", "no-checkpoint", "incompatible", "tiny-data", "bad-override",
                                  "bad-split", "empty-tasks", "empty-folder", "no-such-data"])
def test_bad_input_exits_2_and_writes_nothing(case, trained_run, tmp_path, cli_module):
    run = tmp_path / "run"
    args = []
    if case == "not-a-run":
        run.mkdir()
    else:
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval"))
    if case == "no-checkpoint":
        shutil.rmtree(run / "checkpoints")
    elif case == "incompatible":
        cfg = run / "config.yaml"
        cfg.write_text(cfg.read_text().replace("d_model: 32", "d_model: 48"))
    elif case == "tiny-data":
        (tmp_path / "tiny.txt").write_text("hi")
        args = ["--data", tmp_path / "tiny.txt"]
    elif case == "bad-override":
        args = ["model.d_model=64"]
    elif case == "bad-split":
        args = ["--split", "test"]
    elif case == "empty-tasks":
        args = ["--tasks", " , "]
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args = ["--data", tmp_path / "empty"]
    elif case == "no-such-data":
        args = ["--data", tmp_path / "missing.txt"]
    r = cli_module("eval", run, *args, "-q")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "error:" in r.stderr
    assert not (run / "eval").exists()


@pytest.mark.train
@pytest.mark.parametrize("kind", ["expert_choice", "competition"])
def test_router_specific_sections(kind, corpus, tmp_path, cli_module):
    overrides = (["model.moe.router.kind=expert_choice"] if kind == "expert_choice"
                 else ["model.moe.competition.rate=1.0", "model.moe.competition.warmup=0"])
    run = train_run(corpus, tmp_path, kind, overrides, max_steps=2, checkpoint_every=2)
    r = cli_module("eval", run, "--batches", "2", "--no-plots", "-q")
    assert r.exit_code == 0, r.output
    res = json.loads((run / "eval" / "results.json").read_text())
    if kind == "expert_choice":
        assert not res["robustness"]["defined"] and "experts choose tokens" in res["robustness"]["reason"]
    else:
        agree = res["routing"]["overall"]["variant_agreement"]
        assert agree["with"] == "competition" and 0 <= agree["top1"] <= 1 and 0 <= agree["overlap"] <= 1
        assert res["robustness"]["defined"]


def test_refuses_to_run_as_one_of_several_processes(trained_run, tmp_path, cli_module, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli_module("eval", trained_run, "--out", tmp_path / "out", "-q")
    assert r.exit_code == 2 and "one process" in r.stderr
    assert not (tmp_path / "out").exists()


def test_another_recipe_is_split_by_its_own_seed(trained_run, tmp_path):
    from moectl.eval.runner import _data_config

    other = tmp_path / "other.yaml"
    cfg = (trained_run / "config.yaml").read_text()
    other.write_text(cfg.replace("seed: 0\n", "seed: 7\n", 1))
    data, split = _data_config(load_run(trained_run), str(other), [])
    assert split == "val" and data.split_seed == 7
    data, _ = _data_config(load_run(trained_run), str(other), ["data.split_seed=3"])
    assert data.split_seed == 3


def test_stale_plots_go_and_stray_arguments_are_explained(trained_run, tmp_path, cli_module):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert cli_module("eval", trained_run, "--out", out, "--batches", "1", "-q", "--no-robustness").exit_code == 0
    assert (out / "expert_load.png").is_file() and (out / "mutual_information.png").is_file()
    assert cli_module("eval", trained_run, "--out", out, "--batches", "1", "-q", "--no-plots").exit_code == 0
    assert not list(out.glob("*.png"))
    r = cli_module("eval", trained_run, "notes/b.txt", "-q", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "quoted" in r.stderr
    r = cli_module("eval", trained_run, "--limit", "3", "-q", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--tasks" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_router_breaking_the_perturbation_is_an_error_not_a_traceback(trained_run, tmp_path, cli_module,
                                                                         monkeypatch):
    from moectl.core.routers.topk import TopKRouter

    monkeypatch.setattr(TopKRouter, "top1_excluded", lambda self, probs, ctx: None)
    r = cli_module("eval", trained_run, "--out", tmp_path / "o", "--batches", "1", "-q")
    assert r.exit_code == 2 and "most probable expert" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_eval_prints_a_hint_that_installs_it(trained_run, tmp_path, cli_module, monkeypatch):
    """The hint, as the terminal shows it, is a command that installs the plot extra's packages into
    this very interpreter (pasted into a shell, it works; nothing in it is eaten as markup)."""
    import shlex

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = cli_module("eval", trained_run, "--out", tmp_path / "o", "--batches", "1", "--no-robustness")
    assert r.exit_code == 0, r.output
    line = next(line for line in r.stderr.splitlines() if "no plots" in line)
    command = line[line.index("install it: ") + len("install it: "):line.index(" (moectl's")]
    assert shlex.split(command) == [sys.executable, "-m", "pip", "install", "matplotlib>=3.7"]
    assert (tmp_path / "o" / "results.json").is_file() and not list((tmp_path / "o").glob("*.png"))
    help_text = " ".join(re.sub("[│╭╮╰╯─]", " ", cli_module("eval", "--help").output).split())
    assert "needs moectl's plot extra: matplotlib" in help_text and "needs moectl's eval extra (lm-eval)" in help_text
