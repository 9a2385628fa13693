from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli():
    """Run the moectl CLI in-process; returns click's Result (exit_code, output, stderr)."""
    from moectl.cli.app import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)

    return run


@pytest.fixture
def write(tmp_path):
    def _write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    return _write


TINY_RECIPE = """\
name: tiny
seed: 0
model:
  vocab_size: 64
  d_model: 32
  n_layers: 2
  n_heads: 4
  ffn_hidden: 64
  seq_len: 16
  moe:
    num_experts: 4
    top_k: 2
    expert_hidden: 32
    layers: all
"""


@pytest.fixture
def tiny_recipe(write) -> Path:
    return write("tiny.yaml", TINY_RECIPE)
