"""Hostile input, case by case: recipes and data files a user (or a damaged disk) can produce.
Every case is exit code 2, one message, no traceback, nothing half-written."""

from __future__ import annotations

import gzip
import os

import pytest

from tests.conftest import train_recipe_text

MODEL = """model:
  vocab_size: 512
  d_model: 32
  n_layers: 2
  n_heads: 4
  ffn_hidden: 64
"""

RECIPES = {
    "python tag": ("!!python/object/apply:os.system ['touch pwned']\n", "python"),
    "python tag inside": (MODEL + "  seq_len: !!python/object/apply:os.getcwd []\n", "python"),
    "top-level list": ("- a\n- b\n", "mapping"),
    "top-level scalar": ("just text\n", "mapping"),
    "empty file": ("", "model"),
    "only a comment": ("# nothing\n", "model"),
    "tab indentation": ("model:\n\tvocab_size: 3\n", "tabs"),
    "duplicate key": (MODEL + "  d_model: 64\n", "duplicate"),
    "binary": ("\x00\x01\x02\xff\xfe".encode("latin-1").decode("latin-1"), "not a text file"),
    "unclosed bracket": ("model: {vocab_size: 3\n", ""),
    "unknown top key": (MODEL + "trian:\n  max_steps: 3\n", "trian"),
    "unknown deep key": (MODEL + "  moe:\n    num_experts: 4\n    top_k: 2\n    expert_hidden: 8\n    rooter: x\n",
                         "rooter"),
    "string for int": (MODEL.replace("n_layers: 2", "n_layers: two"), "n_layers"),
    "negative size": (MODEL.replace("d_model: 32", "d_model: -32"), "d_model"),
    "zero heads": (MODEL.replace("n_heads: 4", "n_heads: 0"), "n_heads"),
    "huge int": (MODEL.replace("vocab_size: 512", "vocab_size: 99999999999999999999999999"), "cannot be built"),
    "bool for int": (MODEL.replace("n_layers: 2", "n_layers: true"), "n_layers"),
    "list for section": ("model: [1, 2]\n", "model"),
    "null model": ("model: null\n", "model"),
    "nan lr": (MODEL + "train:\n  lr: .nan\n", "finite"),
    "inf lr": (MODEL + "train:\n  lr: .inf\n", "finite"),
    "merge key of a scalar": (MODEL + "train:\n  <<: 3\n", ""),
    "extends a folder": ("extends: .\n" + MODEL, "extends"),
    "extends itself": ("extends: r.yaml\n" + MODEL, "cycle"),
    "extends a binary file": ("extends: blob.bin\n" + MODEL, ""),
    "extends a number": ("extends: 3\n" + MODEL, "extends"),
    "name with slash": ("name: a/b\n" + MODEL, "name"),
    "plugins not a list": ("plugins: os\n" + MODEL, "plugins"),
    "plugin that does not exist": ("plugins: [no_such_module_here]\n" + MODEL, "no_such_module_here"),
    "bad router kind": (MODEL + "  moe:\n    num_experts: 4\n    top_k: 2\n    expert_hidden: 8\n"
                        "    router: {kind: teleport}\n", "teleport"),
    "top_k above experts": (MODEL + "  moe:\n    num_experts: 4\n    top_k: 9\n    expert_hidden: 8\n", "top_k"),
    "moe layer out of range": (MODEL + "  moe:\n    num_experts: 4\n    top_k: 2\n    expert_hidden: 8\n"
                               "    layers: [7]\n", "layers"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_hostile_recipes(case, tmp_path, cli, monkeypatch):
    text, word = RECIPES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blob.bin").write_bytes(os.urandom(512))
    (tmp_path / "r.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    commands = ((("build", "r.yaml"),) if case == "huge int"
                else (("recipes", "validate", "r.yaml"), ("build", "r.yaml")))
    for command in commands:
        r = cli(*command)
        assert r.exit_code == 2, (case, command, r.output)
        assert "Traceback" not in r.output and word.lower() in r.output.lower(), (case, r.output)
    assert not (tmp_path / "pwned").exists()


def _gz_truncated(p):
    data = gzip.compress(b"hello world " * 1000)
    (p / "a.txt.gz").write_bytes(data[: len(data) // 2])


def _parquet_garbage(p):
    (p / "a.parquet").write_bytes(b"PAR1" + os.urandom(200))


def _fifo(p):
    os.mkfifo(p / "a.txt")


def _loop(p):
    os.symlink(p / "b.txt", p / "a.txt")
    os.symlink(p / "a.txt", p / "b.txt")


DATA = {
    "not utf-8": (lambda p: (p / "a.txt").write_bytes(b"\xff\xfe\x00bad" * 100), "UTF-8"),
    "jsonl with a non-object": (lambda p: (p / "a.jsonl").write_text('{"text": "a"}\n[1, 2]\n'), "a.jsonl"),
    "jsonl with broken json": (lambda p: (p / "a.jsonl").write_text('{"text": "a"}\n{"text": \n'), "a.jsonl"),
    "jsonl without the text field": (lambda p: (p / "a.jsonl").write_text('{"body": "a"}\n'), "text"),
    "json with a number for text": (lambda p: (p / "a.json").write_text('[{"text": 3}]'), "text"),
    "truncated gzip": (_gz_truncated, "a.txt.gz"),
    "garbage parquet": (_parquet_garbage, "a.parquet"),
    "a folder named like a file": (lambda p: (p / "a.txt").mkdir(), "is a folder"),
    "a named pipe": (_fifo, "not a regular file"),
    "a symlink loop": (_loop, "cannot be read"),
    "only empty files": (lambda p: (p / "a.txt").write_text(""), "empty"),
    "only whitespace": (lambda p: (p / "a.txt").write_text("   \n\n\t"), ""),
}


@pytest.mark.parametrize("case", list(DATA))
def test_hostile_data_files(case, tmp_path, cli, write, corpus):
    make, word = DATA[case]
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    recipe = write("r.yaml", train_recipe_text(corpus, max_steps=1).replace(f"{corpus}/*.txt", f"{data}/*"))
    run = tmp_path / "run"
    r = cli("train", recipe, f"data.cache_dir={tmp_path / 'cache'}", "--run-dir", run, "-q")
    assert r.exit_code == 2, (case, r.output)
    assert "Traceback" not in r.output and word.lower() in r.output.lower(), (case, r.output)
    assert not run.exists()
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name] if cache.exists() else True
