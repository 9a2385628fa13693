from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
# Tests never touch the user's cache.
os.environ["MOECTL_CACHE"] = tempfile.mkdtemp(prefix="moectl-test-cache-")
# Without a GPU the Triton kernels run in Triton's interpreter (read when they are defined, so
# before anything imports moectl.core.triton_experts). MOECTL_TEST_TRITON_GPU=1 keeps them compiled.
if os.environ.get("MOECTL_TEST_TRITON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present (they are numerics checks, not timings)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


CORPUS_FILES = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                "colorsys.py", "keyword.py", "abc.py", "copy.py", "queue.py", "sched.py", "statistics.py",
                "random.py", "uuid.py", "base64.py", "calendar.py", "difflib.py", "fractions.py"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real-text corpus: 20 standard-library modules as .txt documents (about 0.4 MB)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, name in enumerate(CORPUS_FILES):
        (root / f"doc{i:02d}.txt").write_text((stdlib / name).read_text())
    return root


def train_recipe_text(corpus: Path, **train) -> str:
    """A tiny MoE training recipe on the test corpus; keyword arguments override train settings."""
    settings = dict(max_steps=6, batch_size=4, lr=1.0e-3, log_every=1, eval_every=3, checkpoint_every=3,
                    eval_batches=2)
    settings.update(train)
    train_yaml = "\n".join(f"  {k}: {v}" for k, v in settings.items())
    return f"""\
name: tiny-train
seed: 0
model:
  vocab_size: 512
  d_model: 32
  n_layers: 2
  n_heads: 4
  ffn_hidden: 64
  seq_len: 32
  moe:
    num_experts: 4
    top_k: 2
    expert_hidden: 32
data:
  source:
    kind: files
    paths: ["{corpus}/*.txt"]
  val_fraction: 0.2
train:
{train_yaml}
"""
