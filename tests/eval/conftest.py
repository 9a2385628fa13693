from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import train_recipe_text


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
def trained_run(corpus, tmp_path_factory) -> Path:
    """A tiny trained top-2 MoE run (6 steps, one checkpoint), shared by the eval tests."""
    return train_run(corpus, tmp_path_factory.mktemp("eval-runs"), "run")
