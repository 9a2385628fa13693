"""Hostile input for every command that reads a run or a model folder: crafted checkpoint contents,
outputs that point at the user's own files, a run folder that brings code, broken generate options,
damaged Hugging Face folders, upcycling beyond the machine. Every case asserts the exit code, the
message and what is (not) on disk afterwards; none may end in a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import trains

LATEST = "checkpoints/step-00000006"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def clean(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    return result.output


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the shared trained run (6 steps, one checkpoint) that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


# --------------------------------------------------------------------------- crafted checkpoint contents

def _optimizer(edit):
    def apply(ckpt: Path) -> str:
        path = ckpt / "optimizer.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
        return "optimizer.pt"
    return apply


def _first(state):
    return next(iter(state["state"].values()))


def _trainer(edit):
    def apply(ckpt: Path) -> str:
        path = ckpt / "trainer.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        return "trainer.json"
    return apply


def _rng(edit):
    def apply(ckpt: Path) -> str:
        path = ckpt / "rng" / "rank-0.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
        return "rank-0.pt"
    return apply


def _weights(edit):
    def apply(ckpt: Path) -> str:
        path = ckpt / "model.safetensors"
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))
        return str(ckpt.name)
    return apply


def _first_weight(state, suffix="attn.wq.weight"):
    return next(k for k in state if k.endswith(suffix))


def _truncate(ckpt: Path) -> str:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors"


def _shrink(s):
    e = _first(s)
    e["exp_avg"] = e["exp_avg"][:1]


def _grow(s):
    e = _first(s)
    e["exp_avg"] = torch.cat([e["exp_avg"], e["exp_avg"]])


def _nan_moment(s):
    _first(s)["exp_avg"][0] = float("nan")


def _negative_second(s):
    _first(s)["exp_avg_sq"][0] = -1.0


def _int_moment(s):
    e = _first(s)
    e["exp_avg"] = e["exp_avg"].to(torch.int32)


def _neg_step(s):
    _first(s)["step"] = torch.tensor(-5.0)


def _huge_step(s):
    _first(s)["step"] = torch.tensor(float("inf"))


def _stranger(s):
    s["state"]["no.such.weight"] = dict(_first(s))


def _neg_lr(s):
    s["param_groups"][0]["lr"] = -1.0


def _bad_betas(s):
    s["param_groups"][0]["betas"] = (1.5, 0.9)


def _unknown_group_param(s):
    s["param_groups"][0]["params"] = ["no.such.weight"]


def _no_groups(s):
    del s["param_groups"]


def _moment_list(s):
    _first(s)["exp_avg"] = [1.0, 2.0]


OPTIMIZER = {
    "moment smaller than the parameter": (_optimizer(_shrink), "has shape"),
    "moment larger than the parameter": (_optimizer(_grow), "has shape"),
    "moment with NaN": (_optimizer(_nan_moment), "NaN"),
    "negative second moment": (_optimizer(_negative_second), "negative"),
    "integer moment": (_optimizer(_int_moment), "not a floating tensor"),
    "negative step count": (_optimizer(_neg_step), "step count"),
    "infinite step count": (_optimizer(_huge_step), "step count"),
    "state of an unknown parameter": (_optimizer(_stranger), "does not have"),
    "negative learning rate": (_optimizer(_neg_lr), "lr"),
    "betas out of range": (_optimizer(_bad_betas), "betas"),
    "group of unknown parameters": (_optimizer(_unknown_group_param), "does not have"),
    "no param_groups": (_optimizer(_no_groups), "param_groups"),
    "moment as a list": (_optimizer(_moment_list), "not a tensor"),
}

TRAINER = {
    "negative step": (_trainer(lambda d: d.update(step=-4)), "step"),
    "step of another folder": (_trainer(lambda d: d.update(step=4)), "folder of step 6"),
    "step as text": (_trainer(lambda d: d.update(step="6")), "step"),
    "step as a boolean": (_trainer(lambda d: d.update(step=True)), "step"),
    "negative tokens": (_trainer(lambda d: d.update(tokens=-1)), "tokens"),
    "tokens as text": (_trainer(lambda d: d.update(tokens="many")), "tokens"),
    "zero batch": (_trainer(lambda d: d.update(global_batch=0)), "global_batch"),
    "schedule of text": (_trainer(lambda d: d.update(schedule="cosine")), "schedule"),
    "schedule segment without total": (_trainer(lambda d: d.update(schedule=[{"start": 0}])), "schedule"),
    "negative start lr": (_trainer(lambda d: d.update(schedule=[{"start": 0, "total": 6, "start_lr": -1}])),
                          "schedule"),
    "validation loss as text": (_trainer(lambda d: d.update(val_loss="low")), "val_loss"),
    "negative epoch": (_trainer(lambda d: d.update(data={"order": "step", "epoch": -1})), "data"),
    "a list": (lambda c: ((c / "trainer.json").write_text("[6]"), "trainer.json")[1], "JSON object"),
}

RNG = {
    "short torch state": (_rng(lambda s: s.update(torch=s["torch"][:100])), "random generator"),
    "torch state of floats": (_rng(lambda s: s.update(torch=s["torch"].float())), "random generator"),
    "python state garbage": (_rng(lambda s: s.update(python=(3, (1, 2), None))), "random generator"),
    "numpy position out of range": (_rng(lambda s: s["numpy"].update(pos=10_000)), "random generator"),
    "numpy keys negative": (_rng(lambda s: s["numpy"].update(keys=-s["numpy"]["keys"] - 1)), "random generator"),
    "not a mapping": (_rng(lambda s: (s.clear(), s.update(x=1))), "random generator"),
}

WEIGHTS = {
    "weight of another shape": (_weights(lambda s: s.update({_first_weight(s): torch.zeros(3, 3)})), "shape differs"),
    "weight with NaN": (_weights(lambda s: s[_first_weight(s)].view(-1).__setitem__(0, float("nan"))), "NaN"),
    "weight with infinity": (_weights(lambda s: s[_first_weight(s)].view(-1).__setitem__(0, float("inf"))), "NaN"),
    "integer weight": (_weights(lambda s: s.update({_first_weight(s): s[_first_weight(s)].to(torch.int32)})),
                       "dtype differs"),
    "boolean weight": (_weights(lambda s: s.update({_first_weight(s): s[_first_weight(s)] > 0})), "dtype differs"),
    "missing weight": (_weights(lambda s: s.pop(_first_weight(s))), "missing"),
    "extra weight": (_weights(lambda s: s.update({"layers.99.extra": torch.zeros(2)})), "unexpected"),
    "truncated file": (_truncate, "model.safetensors"),
}


def _resume(cli, trained_run, run):
    return cli("train", trained_run.parent / "run.yaml", "--run-dir", run, "--resume", "auto", "-q",
               "train.max_steps=8")


@pytest.mark.parametrize("case", [*OPTIMIZER, *TRAINER, *RNG, *WEIGHTS])
def test_resume_refuses_crafted_checkpoint(case, run_copy, trained_run, cli):
    damage, words = {**OPTIMIZER, **TRAINER, **RNG, **WEIGHTS}[case]
    named = damage(run_copy / LATEST)
    before = snapshot(run_copy / "checkpoints")
    out = clean(_resume(cli, trained_run, run_copy))
    assert named in out and words in out, out
    assert snapshot(run_copy / "checkpoints") == before          # nothing trained, nothing saved


@pytest.mark.parametrize("command", ["eval", "generate", "convert", "profile"])
@pytest.mark.parametrize("case", list(WEIGHTS))
def test_readers_refuse_crafted_weights(case, command, run_copy, cli, tmp_path):
    damage, words = WEIGHTS[case]
    named = damage(run_copy / LATEST)
    args = {"eval": ["eval", run_copy, "-q", "--batches", "1", "--out", tmp_path / "ev"],
            "generate": ["generate", run_copy, "-p", "def ", "-n", "2"],
            "convert": ["convert", run_copy, "--to", "hf", tmp_path / "hf"],
            "profile": ["profile", run_copy, "--steps", "1", "--warmup", "0", "--no-backends"]}[command]
    out = clean(cli(*args))
    assert named in out and words in out, out
    assert not (tmp_path / "ev").exists() and not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- outputs and the user's files

@pytest.mark.parametrize("where", ["run", "checkpoints", "checkpoint", "logs", "parent of the run"])
def test_convert_force_never_reaches_into_the_input(where, run_copy, cli):
    target = {"run": run_copy, "checkpoints": run_copy / "checkpoints", "checkpoint": run_copy / LATEST,
              "logs": run_copy / "logs", "parent of the run": run_copy.parent}[where]
    before = snapshot(run_copy)
    out = clean(cli("convert", run_copy / LATEST, "--to", "hf", target, "--force"))
    assert "input" in out or "current folder" in out
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("mode", ["--to", "--from", "--upcycle"])
def test_convert_force_keeps_a_folder_of_the_users_files(mode, run_copy, cli, tmp_path, dense_source):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    source = {"--to": run_copy, "--from": dense_source["hf"], "--upcycle": dense_source["run"]}[mode]
    extra = {"--to": ["--to", "hf"], "--from": ["--from", "hf"],
             "--upcycle": ["--upcycle", "--experts", "4", "--top-k", "2"]}[mode]
    out = clean(cli("convert", source, mine, *extra, "--force"))
    assert "did not write" in out
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("where", ["current folder", "parent of the current folder"])
def test_convert_never_replaces_the_current_folder(where, run_copy, cli, tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    target = Path(".") if where == "current folder" else Path("..")
    out = clean(cli("convert", run_copy, "--to", "hf", target, "--force"))
    assert "current folder" in out and (work / "notes.txt").read_text() == "mine"


def test_convert_force_replaces_its_own_output(run_copy, cli, tmp_path):
    assert cli("convert", run_copy, "--to", "hf", tmp_path / "hf").exit_code == 0
    first = snapshot(tmp_path / "hf")
    r = cli("convert", run_copy, "--to", "hf", tmp_path / "hf", "--force", "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert snapshot(tmp_path / "hf") != first and (tmp_path / "hf" / ".moectl-output").is_file()


@pytest.mark.parametrize("files", [["curves.png"], ["expert_load.png", "mine.txt"], ["results.json"],
                                   ["notes.md"]])
def test_eval_out_keeps_the_users_files(files, run_copy, cli, tmp_path):
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    for name in files:
        (out_dir / name).write_text("the user's own")
    before = snapshot(out_dir)
    out = clean(cli("eval", run_copy, "-q", "--batches", "1", "--out", out_dir))
    assert "did not write" in out and snapshot(out_dir) == before


def test_eval_out_replaces_its_own_report(run_copy, cli, tmp_path):
    out_dir = tmp_path / "report"
    for _ in range(2):
        r = cli("eval", run_copy, "-q", "--batches", "1", "--no-robustness", "--out", out_dir)
        assert r.exit_code == 0, r.output
    assert json.loads((out_dir / "results.json").read_text())["format"] == "moectl.eval"


@pytest.mark.parametrize("target", ["the run", "its checkpoints", "its logs"])
def test_eval_out_never_writes_into_the_runs_own_files(target, run_copy, cli):
    folder = {"the run": run_copy, "its checkpoints": run_copy / "checkpoints", "its logs": run_copy / "logs"}[target]
    before = snapshot(run_copy)
    out = clean(cli("eval", run_copy, "-q", "--batches", "1", "--out", folder))
    assert "did not write" in out and snapshot(run_copy) == before


def test_schema_output_onto_a_folder(cli, tmp_path):
    out = clean(cli("recipes", "schema", "-o", tmp_path))
    assert f"{tmp_path} is a folder" in out and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- code that comes with a folder

EVIL = "open({marker!r}, 'w').write('ran')\n"


@pytest.mark.parametrize("command", ["eval", "generate", "convert", "profile"])
def test_a_run_folder_cannot_bring_its_own_plugin(command, run_copy, cli, tmp_path, monkeypatch):
    """The run's config.yaml names a plugin that the folder ships; with the folder as the current
    folder on sys.path (as `python -m moectl` has it), nothing of it runs."""
    import yaml

    marker = tmp_path / "PWNED"
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["plugins"] = ["folder_plugin"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    (run_copy / "folder_plugin.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(run_copy)
    monkeypatch.syspath_prepend(str(run_copy))
    sys.modules.pop("folder_plugin", None)
    args = {"eval": ["eval", ".", "-q", "--batches", "1", "--out", tmp_path / "ev"],
            "generate": ["generate", ".", "-p", "x", "-n", "1"],
            "convert": ["convert", ".", "--to", "hf", tmp_path / "hf"],
            "profile": ["profile", ".", "--steps", "1", "--warmup", "0", "--no-backends"]}[command]
    out = clean(cli(*args))
    assert "folder_plugin" in out and "never come from that folder" in out
    assert not marker.exists() and "folder_plugin" not in sys.modules


# --------------------------------------------------------------------------- generate

@pytest.mark.parametrize(("options", "words"), [
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--temperature", "inf"], "not a finite number"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "nan"], "top_p"),
    (["--top-k", "0"], "--top-k"),
    (["--num-samples", "2", "--temperature", "0"], "greedy"),
    (["-n", "-1"], "--max-new-tokens"),
])
def test_generate_refuses_bad_options(options, words, trained_run, cli):
    out = clean(cli("generate", trained_run, "-p", "def ", *options))
    assert words in out


@pytest.mark.parametrize("options", [["--temperature", "1e-30"], ["--temperature", "1e-8", "--top-p", "1e-9"],
                                     ["--top-p", "1e-30"], ["--top-k", "1", "--temperature", "5"]])
def test_generate_extreme_but_valid_sampling_works(options, trained_run, cli):
    r = cli("generate", trained_run, "-p", "def ", "-n", "3", *options)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("prompt", ["\udcff\udcfe", "ok\udc80"])
def test_generate_refuses_a_prompt_that_is_not_utf8(prompt, trained_run, cli):
    assert "not valid UTF-8" in clean(cli("generate", trained_run, "-p", prompt))


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_tokenizer_larger_than_the_model_is_refused(command, run_copy, cli, tmp_path):
    tok = json.loads((run_copy / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(600):
        vocab[f"extra{i}"] = len(vocab)
    (run_copy / "tokenizer.json").write_text(json.dumps(tok))
    args = ["generate", run_copy, "-p", "x"] if command == "generate" else ["eval", run_copy, "-q", "--out",
                                                                              tmp_path / "ev"]
    out = clean(cli(*args))
    assert "tokens but the model has" in out and not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------- convert: damaged folders

@pytest.fixture(scope="module")
@trains
def dense_source(corpus, tmp_path_factory):
    """A dense trained run and its Hugging Face export (Llama), to import and upcycle."""
    from tests.conftest import train_run

    root = tmp_path_factory.mktemp("dense")
    run = train_run(corpus, root, "dense", overrides=["model.moe=null"], max_steps=2, checkpoint_every=2)
    from moectl.convert.export import export_hf

    export_hf(run, root / "hf")
    return {"run": run, "hf": root / "hf"}


def _hf_copy(dense_source, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(dense_source["hf"], dst)
    return dst


def _config_edit(**changes):
    def apply(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        (src / "config.json").write_text(json.dumps(cfg))
    return apply


def _write(name: str, text: str):
    def apply(src: Path) -> None:
        (src / name).write_text(text)
    return apply


def _link_tokenizer(src: Path) -> None:
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")


def _big_tokenizer(src: Path) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    for i in range(600):
        tok["model"]["vocab"][f"extra{i}"] = len(tok["model"]["vocab"])
    (src / "tokenizer.json").write_text(json.dumps(tok))


HF = {
    "model_type as a list": (_config_edit(model_type=["llama"]), "model_type"),
    "model_type as a number": (_config_edit(model_type=7), "model_type"),
    "unknown model_type": (_config_edit(model_type="gpt17"), "not a family"),
    "deeply nested config": (_write("config.json", '{"a":' * 50_000 + "1" + "}" * 50_000), "nests too deeply"),
    "config not JSON": (_write("config.json", "{not json"), "cannot be read as JSON"),
    "config a list": (_write("config.json", "[1, 2]"), "not a JSON object"),
    "sizes of a trillion parameters": (_config_edit(hidden_size=10**6, intermediate_size=10**6, vocab_size=10**6),
                                       "do not fit"),
    "negative size": (_config_edit(hidden_size=-32), ""),
    "tokenizer linked to a system file": (_link_tokenizer, "not a valid tokenizer.json"),
    "tokenizer not JSON": (_write("tokenizer.json", "{oops"), "not a valid tokenizer.json"),
    "tokenizer larger than the vocabulary": (_big_tokenizer, "tokens but the model's vocabulary"),
    "weights truncated": (lambda s: (s / "model.safetensors").write_bytes(b"\x00" * 16), "safetensors"),
    "weights missing": (lambda s: (s / "model.safetensors").unlink(), "holds no weights"),
    "weights with NaN": (lambda s: _nan_weights(s), "NaN"),
}


def _nan_weights(src: Path) -> None:
    state = load_file(str(src / "model.safetensors"))
    key = next(k for k in state if state[k].is_floating_point())
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(src / "model.safetensors"))


@pytest.mark.parametrize("case", list(HF))
def test_import_refuses_damaged_folders(case, dense_source, cli, tmp_path):
    src = _hf_copy(dense_source, tmp_path)
    damage, words = HF[case]
    damage(src)
    out = clean(cli("convert", src, "--from", "hf", tmp_path / "out"))
    assert words in out, out
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temporaries


@pytest.mark.parametrize(("options", "words"), [
    (["--experts", "10000000", "--top-k", "2"], "more than this machine's memory"),
    (["--experts", "1", "--top-k", "1"], "at least 2"),
    (["--experts", "4", "--top-k", "5"], "--top-k"),
    (["--experts", "4", "--top-k", "2", "--granularity", "3"], "--granularity"),
    (["--experts", "4", "--top-k", "2", "--layers", "9"], "--layers"),
    (["--experts", "4", "--top-k", "2", "--layers", "x,y"], "--layers"),
    (["--experts", "4", "--top-k", "2", "--noise", "-1"], "--noise"),
    (["--experts", "4"], "--top-k"),
])
def test_upcycle_refuses_bad_options(options, words, dense_source, cli, tmp_path):
    out = clean(cli("convert", dense_source["run"], tmp_path / "up", "--upcycle", *options))
    assert words in out and not (tmp_path / "up").exists()


def test_upcycle_takes_its_name(dense_source, cli, tmp_path):
    r = cli("convert", dense_source["run"], tmp_path / "up", "--upcycle", "--experts", "4", "--top-k", "2",
            "--name", "my-moe")
    assert r.exit_code == 0, r.output
    import yaml

    assert yaml.safe_load((tmp_path / "up" / "config.yaml").read_text())["name"] == "my-moe"


@pytest.mark.processes
def test_sigterm_during_convert_leaves_nothing(dense_source, tmp_path):
    """A convert stopped by SIGTERM removes its temporary folder and writes no output."""
    import signal
    import subprocess
    import time

    from tests.conftest import REPO

    out = tmp_path / "hf"
    code = ("import time, moectl.convert.hfio as h\n"
            "real = h.write_weights_plan\n"
            "def slow(*a, **k):\n    r = real(*a, **k)\n    print('WROTE', flush=True)\n"
            "    time.sleep(60)\n    return r\n"
            "h.write_weights_plan = slow\n"
            "import moectl.convert.export as e\ne.write_weights_plan = slow\n"
            "from moectl.cli.app import main\nimport sys\n"
            f"sys.argv = ['moectl', 'convert', {str(dense_source['run'])!r}, '--to', 'hf', {str(out)!r}]\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "WROTE" not in line:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- export: what transformers may do

def test_an_expert_choice_export_refuses_to_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    from moectl.convert.export import export_hf
    from tests.convert.test_export import MOE, model_folder

    src = model_folder(tmp_path, "ec", dict(moe=dict(MOE, router=dict(kind="expert_choice"))))
    export_hf(src, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.randint(0, 96, (1, 8))
    assert model(ids).logits.shape == (1, 8, 96)          # scoring works
    with pytest.raises(ValueError, match="not causal"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


# --------------------------------------------------------------------------- compare

@pytest.mark.parametrize(("damage", "words"), [
    (lambda r: (r / "logs" / "summary.json").write_text("{"), "summary.json"),
    (lambda r: (r / "logs" / "summary.json").write_text('{"a":' * 50_000 + "1" + "}" * 50_000), "nests too deeply"),
    (lambda r: (r / "logs" / "metrics.jsonl").write_text("garbage\nmore\n"), "metrics.jsonl"),
    (lambda r: (r / "config.yaml").write_text("!!python/object/apply:os.system ['true']\n"), "config.yaml"),
])
def test_compare_refuses_damaged_runs(damage, words, run_copy, cli, tmp_path):
    damage(run_copy)
    out = clean(cli("compare", run_copy, "--out", tmp_path / "cmp"))
    assert words in out and not (tmp_path / "cmp").exists()


def test_compare_names_a_symlink_loop(cli, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "loop" in clean(cli("compare", tmp_path / "a"))


# --------------------------------------------------------------------------- plugins that break later

FLAKY = '''
from dataclasses import dataclass
from moectl.core import register_router
from moectl.core.routers.topk import TopKOptions, TopKRouter


@dataclass
class FlakyOptions(TopKOptions):
    pass


@register_router("flaky_after_first", options=FlakyOptions)
class FlakyRouter(TopKRouter):
    """Keeps the contract on its first forward only."""

    calls = 0

    def forward(self, x, ctx, state):
        out = super().forward(x, ctx, state)
        type(self).calls += 1
        if type(self).calls > 2:
            out.expert_ids_TK.add_(self.num_experts)   # expert ids past the last expert
        return out
'''


@pytest.fixture
def flaky_recipe(tmp_path, monkeypatch):
    from moectl.core import registry

    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "flaky_router.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    recipe = tmp_path / "flaky.yaml"
    recipe.write_text("plugins: [flaky_router]\nname: flaky\nmodel: {vocab_size: 256, d_model: 32, n_layers: 2, "
                      "n_heads: 4, ffn_hidden: 64, seq_len: 32, moe: {num_experts: 4, top_k: 2, expert_hidden: 16, "
                      "router: {kind: flaky_after_first}}}\ntrain: {batch_size: 2}\n")
    yield recipe
    registry.routers.remove("flaky_after_first")
    sys.modules.pop("flaky_router", None)


def test_a_router_that_breaks_its_contract_later_is_named_by_the_engine(flaky_recipe):
    from moectl.core.moe import RouterContractError
    from moectl.factory import build_model
    from moectl.recipe.load import load_recipe

    model = build_model(load_recipe(flaky_recipe))
    ids = torch.randint(0, 256, (2, 16))
    model(ids, ids)                                 # two layers, first forward: the contract holds
    with pytest.raises(RouterContractError, match="flaky_after_first.*expert ids must lie in 0..3"):
        model(ids, ids)


def test_a_router_that_breaks_its_contract_later_under_profile(flaky_recipe, cli, tmp_path):
    out = clean(cli("profile", flaky_recipe, "--steps", "2", "--warmup", "1", "--no-backends", "--json",
                    tmp_path / "p.json"))
    assert "breaks the router contract" in out and not (tmp_path / "p.json").exists()


# --------------------------------------------------------------------------- profile options

@pytest.mark.parametrize(("options", "words"), [
    (["--steps", "0"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--batch-size", "0"], "--batch-size"),
    (["--precision", "fp8"], "fp8"),
    (["--device", "tpu"], "tpu"),
    (["model.d_model=-3"], "d_model"),
])
def test_profile_refuses_bad_options(options, words, cli):
    out = clean(cli("profile", "quickstart", "--no-backends", *options))
    assert words in out


# --------------------------------------------------------------------------- full disks

@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB tmpfs (skipped where this machine cannot mount one)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()[:100]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.processes
@pytest.mark.parametrize("mode", ["export", "import"])
def test_convert_onto_a_full_disk(mode, run_copy, dense_source, cli, tiny_disk):
    source, how = (run_copy, ["--to", "hf"]) if mode == "export" else (dense_source["hf"], ["--from", "hf"])
    out = clean(cli("convert", source, tiny_disk / "out", *how))
    assert "no space left" in out and str(tiny_disk) in out
    assert not list(tiny_disk.iterdir())        # neither the output nor a temporary


@pytest.mark.processes
def test_eval_onto_a_full_disk(run_copy, cli, tiny_disk):
    (tiny_disk / "fill").write_bytes(b"x" * (60 * 1024))
    out = clean(cli("eval", run_copy, "-q", "--batches", "1", "--no-plots", "--out", tiny_disk / "ev"))
    assert "no space left" in out or "cannot write" in out
    assert not (tiny_disk / "ev" / "results.json").exists()


# --------------------------------------------------------------------------- compare --out, train --run-dir

@pytest.mark.parametrize("files", [["curves.png"], ["compare.md"], ["compare.json"], ["paper.pdf"]])
def test_compare_out_keeps_the_users_files(files, trained_run, cli, tmp_path):
    out_dir = tmp_path / "cmp"
    out_dir.mkdir()
    for name in files:
        (out_dir / name).write_text("the user's own")
    before = snapshot(out_dir)
    assert "did not write" in clean(cli("compare", trained_run, "--out", out_dir))
    assert snapshot(out_dir) == before


def test_compare_out_replaces_its_own_comparison(trained_run, cli, tmp_path):
    for _ in range(2):
        r = cli("compare", trained_run, "--out", tmp_path / "cmp")
        assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["format"] == "moectl.compare"


@pytest.mark.parametrize("files", [["thesis.tex"], ["data", "notes.md"], ["model.safetensors"]])
def test_train_never_writes_among_the_users_files(files, trained_run, cli, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("the user's own")
    before = snapshot(folder)
    out = clean(cli("train", trained_run.parent / "run.yaml", "--run-dir", folder, "-q"))
    assert "not a run's" in out and snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == files
