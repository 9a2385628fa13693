"""`moectl convert` as a user meets it: an imported model trains, evaluates and generates; bad
input is a clear message with exit code 2 and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.convert.conftest import VARIANTS, hf_model, save_hf


@pytest.fixture
def hf_with_tokenizer(trained_run, tmp_path):
    """A Mixtral folder whose vocabulary is the trained run's tokenizer."""
    kw = {**VARIANTS[("mixtral", "base")], "vocab_size": 512}
    src = save_hf(hf_model("mixtral", **kw), tmp_path / "hf")
    shutil.copyfile(trained_run / "tokenizer.json", src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return src


def test_imported_model_trains_evaluates_and_generates(hf_with_tokenizer, corpus, tmp_path, cli):
    out = tmp_path / "imported"
    r = cli("convert", hf_with_tokenizer, "--from", "hf", out)
    assert r.exit_code == 0, r.output
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "convert.json"} <= {p.name for p in out.iterdir()}
    r = cli("generate", out, "--prompt", "def ", "-n", "4", "--temperature", "0")
    assert r.exit_code == 0, r.output
    source = f"data.source={{kind: files, paths: ['{corpus}/*.txt']}}"
    r = cli("train", out, "train.max_steps=2", "train.eval_batches=1", "train.batch_size=2", "model.seq_len=32",
            source, "data.val_fraction=0.2", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "checkpoints" / "step-00000002").is_dir()
    # training started from the imported weights (train.init_from), not from a fresh initialisation
    from safetensors.torch import load_file

    start = load_file(out / "model.safetensors")["embed.weight"]
    trained = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")["embed.weight"]
    assert float((trained - start).abs().max()) < 0.1 * float(start.abs().max())
    r = cli("eval", out, "--no-plots", "--no-robustness")
    assert r.exit_code == 0, r.output
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["step"] == 2


def test_export_cli_reports_the_class(trained_run, tmp_path, cli):
    r = cli("convert", trained_run, "--to", "hf", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert "Mixtral (MixtralForCausalLM)" in r.output
    r = cli("convert", trained_run, "--to", "hf", tmp_path / "gen", "--generated-code")
    assert r.exit_code == 0 and "trust_remote_code=True" in r.output, r.output


def test_output_folder_rules(trained_run, tmp_path, cli):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("convert", trained_run, "--to", "hf", out)
    assert r.exit_code == 2 and "is not empty" in r.output and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = cli("convert", trained_run, "--to", "hf", out, "--force")      # not a folder moectl wrote: kept
    assert r.exit_code == 2 and "holds files moectl did not write" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli("convert", trained_run, "--to", "hf", out).exit_code == 0   # empty: used
    r = cli("convert", trained_run, "--to", "hf", out, "--force")          # moectl's own output: replaced
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and (out / ".moectl-output").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temporaries left
    r = cli("convert", out, "--from", "hf", out)
    assert r.exit_code == 2 and "is the input" in r.output


def _broken(tmp_path, name, edit):
    src = save_hf(hf_model("qwen2_moe", **VARIANTS[("qwen2_moe", "base")]), tmp_path / name)
    edit(src)
    return src


def _config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


class Payload:
    """Stands for arbitrary pickled code."""


def _pickle_bin(src):
    (src / "model.safetensors").unlink()
    torch.save({"w": Payload()}, src / "pytorch_model.bin")


def _shards(src):
    from safetensors.torch import load_file

    from moectl.convert.hfio import write_weights

    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    files = write_weights(src, state, max_shard_bytes=20_000)
    (src / files[1]).unlink()


BROKEN = {
    "unknown architecture": (lambda s: _config(s, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                             "model_type 'gpt2' (GPT2LMHeadModel) is not a family moectl converts"),
    "no config": (lambda s: (s / "config.json").unlink(), "has no config.json"),
    "damaged config": (lambda s: (s / "config.json").write_text("{not json"), "cannot be read as JSON"),
    "no weights": (lambda s: (s / "model.safetensors").unlink(), "holds no weights"),
    "damaged weights": (lambda s: (s / "model.safetensors").write_bytes(b"\x00" * 100), "is damaged"),
    "missing shard": (_shards, "lacks 1 of the"),
    "shape mismatch": (lambda s: _config(s, moe_intermediate_size=20), "of another shape"),
    "missing tensors": (lambda s: _config(s, num_hidden_layers=4), "missing: layers.3"),
    "pickled code": (_pickle_bin, "never runs code from a file"),
    "rope scaling": (lambda s: _config(s, rope_parameters={"rope_type": "longrope", "factor": 4.0}),
                     "RoPE scaling 'longrope'"),
    "yarn without a context": (lambda s: _config(s, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                     "original_max_position_embeddings": "long"}),
                               "original_max_position_embeddings is 'long'"),
    "other activation": (lambda s: _config(s, hidden_act="gelu"), "hidden_act is 'gelu'"),
    "bad number": (lambda s: _config(s, hidden_size="wide"), "hidden_size is 'wide', not a int"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_input_is_a_clear_error(case, tmp_path, cli):
    edit, message = BROKEN[case]
    src = _broken(tmp_path, "hf", edit)
    r = cli("convert", src, "--from", "hf", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("args,message", [
    ((), "exactly one of --to hf, --from hf or --upcycle"),
    (("--to", "hf", "--upcycle"), "do not combine"),
    (("--to", "onnx"), "the format moectl converts is 'hf'"),
    (("--to", "hf", "--dtype", "fp8"), "--dtype 'fp8'"),
    (("--to", "hf", "--max-shard-size", "big"), "--max-shard-size 'big'"),
    (("--to", "hf", "--experts", "4"), "belong to --upcycle"),
])
def test_bad_options(trained_run, tmp_path, cli, args, message):
    r = cli("convert", trained_run, tmp_path / "out", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_missing_run(tmp_path, cli):
    r = cli("convert", tmp_path / "nope", "--to", "hf", tmp_path / "out")
    assert r.exit_code == 2 and "no such run or checkpoint" in r.output


def test_init_from_problems_are_clear(corpus, trained_run, tmp_path, cli):
    from tests.conftest import train_recipe_text

    recipe = tmp_path / "r.yaml"
    recipe.write_text(train_recipe_text(corpus, max_steps=1))
    r = cli("train", recipe, f"train.init_from={tmp_path / 'nope'}", "--run-dir", tmp_path / "run", "--quiet")
    assert r.exit_code == 2 and "train.init_from: no such run or checkpoint" in r.output, r.output
    r = cli("train", recipe, f"train.init_from={trained_run}", "model.d_model=64", "--run-dir", tmp_path / "run2",
            "--quiet")
    assert r.exit_code == 2 and "does not match the recipe's model" in r.output, r.output
    r = cli("train", recipe, f"train.init_from={trained_run}", "--run-dir", tmp_path / "run3", "--quiet")
    assert r.exit_code == 0, r.output
