from __future__ import annotations

import os
import subprocess
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
# Several pytest-xdist workers share the cores: one thread each (spinning OpenMP threads of two
# processes slow both down many times over). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# The tiers. `pytest` runs the fast tier: every test not marked with one of these. `pytest --full`
# runs everything (what CI runs). A test that trains or starts a process without its marker fails,
# so the fast tier stays fast.
SLOW_TIERS = {
    "train": "runs the training loop, or needs a trained run",
    "processes": "starts processes (moectl launches, subprocesses)",
    "triton": "runs Triton kernels in Triton's interpreter",
    "slow": "takes more than a few seconds for another reason (benchmarks, large registries)",
}


def trains(fixture):
    """Mark a fixture function that trains (put it under @pytest.fixture): every test using it,
    directly or through another fixture, is in the train tier without saying so."""
    fixture.trains = True
    return fixture


def _uses_training_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(getattr(d.func, "trains", False) for chain in defs for d in chain)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run every tier: also the tests marked " + ", ".join(SLOW_TIERS))


def pytest_configure(config):
    for name, what in SLOW_TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what} (not in the fast tier; run with --full)")


def pytest_collection_modifyitems(config, items):
    """Mark the tests that use a training fixture; leave the slow tiers out unless --full (or -m)
    asks for them; skip GPU tests where CUDA is absent (they are numerics checks, not timings)."""
    for item in items:
        if _uses_training_fixture(item):
            item.add_marker("train")
    if not config.getoption("--full") and not config.option.markexpr:
        kept, left = [], []
        for item in items:
            (left if SLOW_TIERS.keys() & {m.name for m in item.iter_markers()} else kept).append(item)
        if left:
            config.hook.pytest_deselected(items=left)
            items[:] = kept
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The markers of the test being set up or run: a fixture that trains (even a session-scoped one,
# set up for its first test) is checked against the test it is set up for.
_current_marks: set[str] = set()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current_marks.clear()
    _current_marks.update(m.name for m in item.iter_markers())


def _guarded(marker: str, what: str, real, allowed=lambda *args, **kwargs: False):
    def guard(*args, **kwargs):
        if marker not in _current_marks and not allowed(*args, **kwargs):
            pytest.fail(f"this test {what}: mark it @pytest.mark.{marker}", pytrace=False)
        return real(*args, **kwargs)

    return guard


def _git_query(popen, args, *rest, **kwargs) -> bool:
    """A quick `git` query (the reproducibility record reads the commit and the dirty state) is no
    process start the fast tier has to avoid."""
    argv = args if isinstance(args, (list, tuple)) else [args]
    return bool(argv) and str(argv[0]) == "git"


@pytest.fixture(autouse=True, scope="session")
def _tier_guard():
    """Fail a test that trains or starts a process without the marker that keeps it out of the
    fast tier (its fixtures' work included)."""
    from moectl.train.trainer import Trainer

    real_popen, real_run = subprocess.Popen.__init__, Trainer.run
    subprocess.Popen.__init__ = _guarded("processes", "starts a process", real_popen, _git_query)
    Trainer.run = _guarded("train", "trains", real_run)
    yield
    subprocess.Popen.__init__, Trainer.run = real_popen, real_run


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


def train_run(corpus: Path, root: Path, name: str, overrides: list[str] | None = None, **train_settings) -> Path:
    """Train a tiny run on the test corpus into root/name (in-process) and return its folder."""
    from moectl.recipe.load import load_recipe
    from moectl.train.trainer import train

    path = root / f"{name}.yaml"
    settings = dict(max_steps=6, checkpoint_every=6, eval_every=None)
    settings.update(train_settings)
    path.write_text(train_recipe_text(corpus, **{k: ("null" if v is None else v) for k, v in settings.items()}))
    train(load_recipe(path, overrides or []), run_dir=root / name, resume="never", show_progress=False)
    return root / name


@pytest.fixture(scope="session")
@trains
def trained_run(corpus, tmp_path_factory) -> Path:
    """The one tiny trained top-2 MoE run (6 steps, one checkpoint, a tokenizer) that every test
    needing a trained run shares. Tests read it; one that changes a run copies it first."""
    return train_run(corpus, tmp_path_factory.mktemp("trained"), "run")
