"""Experiment trackers (train.track): the recipe section, the flattening of metrics.jsonl records,
a tracker of one's own through a plugin, and W&B (offline) and MLflow (local store) runs read back
through each library's own API."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from moectl import tracking
from moectl.errors import RecipeError
from moectl.recipe.load import load_recipe
from moectl.rundir import RunDir
from tests.conftest import train_recipe_text


def test_scalars_flatten_a_record_like_metrics_jsonl():
    record = {"type": "train", "step": 10, "loss": 2.5, "lr": 1e-3, "mfu": float("nan"), "dead_max": 0,
              "layers": {"L1": {"load": [3, 4], "imbalance": 1.25, "dead": 0}}, "note": "text"}
    assert tracking.scalars(record) == {"train/loss": 2.5, "train/lr": 1e-3, "train/dead_max": 0.0,
                                        "train/L1/imbalance": 1.25, "train/L1/dead": 0.0}
    assert tracking.scalars({"type": "eval", "step": 3, "val_loss": 3.0}) == {"eval/val_loss": 3.0}


def test_flat_config():
    assert tracking.flat_config({"a": {"b": 1, "c": {"d": "x"}}, "e": [1], "f": {}}) == {
        "a.b": 1, "a.c.d": "x", "e": [1], "f": {}}


def test_track_section_is_strict(tiny_recipe):
    rec = load_recipe(tiny_recipe, ["train.track.mlflow={}"])
    assert list(tracking.sections(rec.train.track)) == ["mlflow"]
    assert tracking.sections(load_recipe(tiny_recipe, []).train.track) == {}
    with pytest.raises(RecipeError, match="train.track.neptune"):
        load_recipe(tiny_recipe, ["train.track.neptune={}"])
    with pytest.raises(RecipeError, match="train.track.wandb.mode"):
        load_recipe(tiny_recipe, ["train.track.wandb.mode=sometimes"])


PLUGIN = '''
from dataclasses import dataclass
from moectl.core.registry import option
from moectl.tracking import Tracker, register_tracker

EVENTS = []

@dataclass
class ListOptions:
    fail_at: int = option(0, "Raise in log() at this step (0: never).", ge=0)

@register_tracker("listing", options=ListOptions)
class ListTracker(Tracker):
    """Keeps what it is given, in memory."""

    def start(self, run):
        EVENTS.append(("start", run.name, run.recipe_name, run.resume_step, dict(run.state), run.config["seed"]))
        return {"starts": run.state.get("starts", 0) + 1}

    def log(self, step, values):
        if step == self.options.fail_at:
            raise RuntimeError("the tracker's server went away")
        EVENTS.append(("log", step, values))

    def finish(self, status):
        EVENTS.append(("finish", status))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "my_tracker.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    yield
    from moectl.core import registry
    registry.trackers.remove("listing")
    sys.modules.pop("my_tracker", None)


def _recipe(corpus: Path, tmp_path: Path, **train) -> Path:
    path = tmp_path / "tracked.yaml"
    path.write_text("plugins: [my_tracker]\n" + train_recipe_text(corpus, **train))
    return path


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run).read_metrics() if r["type"] == "train"}


@pytest.mark.train
def test_a_plugin_tracker_gets_every_record_and_resumes(plugin, corpus, tmp_path, cli):
    from moectl.train.trainer import train

    path = _recipe(corpus, tmp_path, max_steps=4, eval_every=2, checkpoint_every=2)
    run = tmp_path / "run"
    train(load_recipe(path, ["train.track.listing={}"]), run_dir=run, resume="never", show_progress=False)
    events = sys.modules["my_tracker"].EVENTS
    assert events[0] == ("start", "run", "tiny-train", 0, {}, 0) and events[-1] == ("finish", "finished")
    logged = {e[1]: e[2]["train/loss"] for e in events if e[0] == "log" and "train/loss" in e[2]}
    assert logged == _losses(run)
    evals = [e[2]["eval/val_loss"] for e in events if e[0] == "log" and "eval/val_loss" in e[2]]
    assert evals == [r["val_loss"] for r in RunDir(run).read_metrics() if r["type"] == "eval"]
    assert json.loads((run / "tracking" / "state.json").read_text()) == {"listing": {"starts": 1}}
    # A resume continues the tracker's run: it is told the step and gets back what it kept.
    events.clear()
    train(load_recipe(path, ["train.track.listing={}", "train.max_steps=6"]), run_dir=run, resume="auto",
          show_progress=False)
    assert events[0] == ("start", "run", "tiny-train", 4, {"starts": 1}, 0)
    assert sorted({e[1] for e in events if e[0] == "log"}) == [5, 6]
    assert json.loads((run / "tracking" / "state.json").read_text()) == {"listing": {"starts": 2}}


@pytest.mark.train
def test_a_tracker_failing_mid_run_is_left_out(plugin, corpus, tmp_path, capsys):
    from moectl.train.trainer import train

    path = _recipe(corpus, tmp_path, max_steps=4, eval_every="null", checkpoint_every=4)
    train(load_recipe(path, ["train.track.listing.fail_at=2"]), run_dir=tmp_path / "run", resume="never",
          show_progress=False)
    err = capsys.readouterr().err
    assert "the listing tracker failed (RuntimeError: the tracker's server went away)" in err
    assert "metrics.jsonl keeps every record" in err
    events = sys.modules["my_tracker"].EVENTS
    assert [e[1] for e in events if e[0] == "log"] == [1] and events[-1][0] == "log"   # dropped, not finished
    assert list(_losses(tmp_path / "run")) == [1, 2, 3, 4]


@pytest.mark.train
def test_a_missing_tracker_library_stops_before_training(corpus, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)    # import mlflow raises ImportError
    path = tmp_path / "r.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=2))
    result = cli("train", path, "--run-dir", tmp_path / "run", "-q", "train.track.mlflow={}")
    assert result.exit_code != 0
    assert "train.track.mlflow needs the mlflow package" in result.output
    assert "-m pip install 'alembic>=1.13' 'mlflow-skinny>=3' 'sqlalchemy>=2'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# --------------------------------------------------------------------------- the real libraries


def read_wandb_history(run_file: Path) -> tuple[list[dict], dict]:
    """The history rows and the config of an offline W&B run, from its .wandb file: W&B's own
    record log format (blocks of 32 KiB, each record a 7-byte header then a protobuf `Record` of
    wandb.proto)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows, config = 7, 32768, b"", [], {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                      # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):                # a whole record, or a record's last piece
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            which = rec.WhichOneof("record_type")
            if which == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif which in ("run", "config"):     # the config at init, and any later updates
                updates = rec.run.config.update if which == "run" else rec.config.update
                config.update({i.key: json.loads(i.value_json) for i in updates})
    return rows, config


@pytest.mark.train
@pytest.mark.processes
def test_wandb_offline_logs_the_same_losses(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from moectl.train.trainer import train

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=4, eval_every=2, checkpoint_every=4))
    run = tmp_path / "run"
    train(load_recipe(path, ["train.track.wandb.project=tests"]), run_dir=run, resume="never", show_progress=False)
    files = list((run / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows, config = read_wandb_history(files[0])
    logged = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert logged == pytest.approx(_losses(run), rel=0, abs=0)
    assert any("eval/val_loss" in r for r in rows) and any("train/L1/imbalance" in r for r in rows)
    assert config["model"]["d_model"] == 32 and config["provenance"]["moectl"]
    state = json.loads((run / "tracking" / "state.json").read_text())
    assert files[0].name == f"run-{state['wandb']['id']}.wandb"


@pytest.mark.train
@pytest.mark.processes   # MLflow asks `uname` for the platform
def test_mlflow_local_store_logs_the_same_losses_and_resumes(corpus, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from moectl.train.trainer import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=4, eval_every=2, checkpoint_every=2))
    run = tmp_path / "run"
    train(load_recipe(path, ["train.track.mlflow.experiment=tests"]), run_dir=run, resume="never",
          show_progress=False)
    state = json.loads((run / "tracking" / "state.json").read_text())["mlflow"]
    assert set(state) == {"run_id"}          # the default store is found again from the run folder
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'tracking' / 'mlflow' / 'mlflow.db'}")
    info = client.get_run(state["run_id"])
    assert info.info.status == "FINISHED" and info.data.params["model.d_model"] == "32"
    assert info.data.tags["moectl.recipe"] == "tiny-train" and "moectl.torch" in info.data.tags
    history = {m.step: m.value for m in client.get_metric_history(state["run_id"], "train/loss")}
    assert history == _losses(run)
    assert [m.step for m in client.get_metric_history(state["run_id"], "eval/val_loss")] == [2, 4]
    # Resumed, the same MLflow run goes on.
    train(load_recipe(path, ["train.track.mlflow.experiment=tests", "train.max_steps=6"]), run_dir=run,
          resume="auto", show_progress=False)
    history = {m.step: m.value for m in client.get_metric_history(state["run_id"], "train/loss")}
    assert history == _losses(run) and sorted(history) == [1, 2, 3, 4, 5, 6]
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1


def _docs_example() -> tuple[str, str]:
    """The tracker plugin and its recipe lines, as docs/training.md shows them."""
    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    section = text.split("### A tracker of your own", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    recipe = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return code, recipe


@pytest.mark.train
def test_the_documented_tracker_plugin_works(corpus, tmp_path, monkeypatch):
    import yaml

    from moectl.core import registry
    from moectl.train.trainer import train

    code, recipe = _docs_example()
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "my_csv_tracker.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    extra = yaml.safe_load(recipe)
    try:
        path = tmp_path / "r.yaml"
        base = yaml.safe_load(train_recipe_text(corpus, max_steps=3, eval_every="null", checkpoint_every=3))
        base["plugins"] = extra["plugins"]
        base["train"]["track"] = extra["train"]["track"]
        path.write_text(yaml.safe_dump(base))
        train(load_recipe(path, []), run_dir=tmp_path / "run", resume="never", show_progress=False)
        lines = (tmp_path / "run" / "tracking" / "csv" / "losses.csv").read_text().splitlines()
        logged = {int(s): float(v) for s, k, v in (line.split(",") for line in lines) if k == "train/loss"}
        assert logged == _losses(tmp_path / "run")
    finally:
        registry.trackers.remove("csv")
        sys.modules.pop("my_csv_tracker", None)


def test_docs_name_every_builtin_tracker():
    from moectl.core import registry

    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    for name in registry.trackers.names():
        assert f"train.track.{name}" in text, name


@pytest.mark.train
@pytest.mark.processes
@pytest.mark.parametrize("damage", ["{not json", '{"mlflow": "abc"}', '{"mlflow": {"run_id": "0123"}}'])
def test_damaged_tracking_state_is_a_message(corpus, tmp_path, cli, damage):
    pytest.importorskip("mlflow")
    path = tmp_path / "r.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=2, checkpoint_every=2))
    run = tmp_path / "run"
    (run / "tracking").mkdir(parents=True)
    (run / "tracking" / "state.json").write_text(damage)
    result = cli("train", path, "--run-dir", run, "-q", "train.track.mlflow={}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "state.json" in result.output


@pytest.mark.train
@pytest.mark.processes
def test_an_unreachable_mlflow_server_is_a_message(corpus, tmp_path, cli, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    path = tmp_path / "r.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=2))
    result = cli("train", path, "--run-dir", tmp_path / "run", "-q", "train.track.mlflow.tracking_uri=http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert "the mlflow tracker could not start" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    # Nothing in the folder stands in the way of the next attempt.
    assert cli("train", path, "--run-dir", tmp_path / "run", "-q").exit_code == 0
