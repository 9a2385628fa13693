"""Seeds as first-class: each seed of a recipe gets its own default folder, and --seeds trains several."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moectl.rundir import default_run_path


@pytest.fixture
def captured(monkeypatch):
    """What `moectl train` would train, without training."""
    import moectl.train.trainer as trainer

    seen = {}

    def fake(rec, run_dir=None, **kwargs):
        seen.update(seed=rec.seed, run_dir=run_dir)
        raise KeyboardInterrupt   # stop before anything is written

    monkeypatch.setattr(trainer, "train", fake)
    return seen


@pytest.mark.parametrize("overrides, folder", [([], None), (["seed=0"], None), (["seed=1"], "quickstart-seed1"),
                                               (["seed=7", "train.max_steps=700"], "quickstart-seed7")])
def test_a_seed_other_than_the_recipes_gets_its_own_folder(cli, captured, overrides, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli("train", "quickstart", *overrides)
    assert captured["run_dir"] == (None if folder is None else Path("runs") / folder)
    assert default_run_path("quickstart", captured["seed"] if folder else None) == Path("runs") / (folder or
                                                                                                   "quickstart")


def test_bad_seed_lists_are_refused(cli, tmp_path):
    for seeds, words in (("0,x", "comma-separated"), ("1,1", "twice"), ("-1", "from 0")):
        r = cli("train", "quickstart", "--seeds", seeds, "--run-dir", tmp_path / "s")
        assert r.exit_code == 2 and words in r.stderr, r.output
    r = cli("train", "quickstart", "seed=2", "--seeds", "0,1")
    assert r.exit_code == 2 and "both set the seed" in r.stderr
    r = cli("train", "quickstart", "model.nope=1", "--seeds", "0,1")
    assert r.exit_code == 2 and r.stderr.count("1 problem") == 1 and "unknown key" in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.train
@pytest.mark.processes
def test_one_command_trains_three_seeds_that_compare_reads(corpus, write, tmp_path, cli):
    from tests.conftest import train_recipe_text

    path = write("r.yaml", train_recipe_text(corpus, max_steps=4, eval_every=2, checkpoint_every=4))
    r = cli("train", path, "data.split_seed=0", "--seeds", "0,1,2", "--jobs", "2", "--run-dir", tmp_path / "study")
    assert r.exit_code == 0, r.output
    folders = [tmp_path / "study" / f"seed{s}" for s in range(3)]
    for s, folder in enumerate(folders):
        assert json.loads((folder / "logs" / "summary.json").read_text())["final_val_loss"] > 0
        assert "seed: " + str(s) in (folder / "config.yaml").read_text()
    c = cli("compare", *folders, "--json")
    assert c.exit_code == 0, c.output
    groups = json.loads(c.stdout)["groups"]
    assert len(groups) == 1 and sorted(groups[0]["seeds"]) == [0, 1, 2]
