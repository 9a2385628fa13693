"""Experiment trackers: where a run's measurements go besides logs/metrics.jsonl.

A recipe switches a tracker on by giving its section under `train.track`:

    train:
      track:
        wandb: {project: my-study}        # Weights & Biases (offline unless mode: online)
        mlflow: {}                        # MLflow (a SQLite store in the run folder by default)

Each tracker receives exactly the records metrics.jsonl gets, flattened to scalars by `scalars`
(`train/loss`, `eval/val_loss`, `train/L3/imbalance`, ...), the resolved recipe as its config and
the reproducibility record. A tracker of one's own is a `Tracker` subclass registered with
`@register_tracker("name", options=SomeDataclass)` in a plugin module (the recipe's `plugins:` or
the `moectl.plugins` entry point); its options become the recipe section `train.track.<name>`,
validated and documented like a router's. Only the first process tracks.

Nothing here imports torch or a tracking library until a tracker starts.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from moectl.core import registry
from moectl.core.registry import option
from moectl.errors import MoectlError
from moectl.extras import install_hint

Status = Literal["finished", "stopped", "failed"]
RESTART = "delete <run>/tracking/state.json to start new tracker runs (the old ones stay where they are)"


@dataclass
class TrackedRun:
    """What a tracker is told when a run starts (or resumes)."""

    name: str                     # the run folder's name (runs/<name>)
    recipe_name: str              # the recipe's `name` (seeds of one recipe share it)
    run_dir: Path
    folder: Path                  # <run>/tracking/<tracker>: the tracker's own files go here
    config: dict[str, Any]        # the resolved recipe
    provenance: dict[str, Any]    # moectl's reproducibility record
    resume_step: int              # 0 for a new run, else the step training continues from
    state: dict[str, Any] = field(default_factory=dict)   # what `start` returned last time (a run id)


class Tracker:
    """The interface of a tracker. `options` is the instance of its registered options dataclass."""

    kind: str = "?"

    def __init__(self, options: Any):
        self.options = options

    def start(self, run: TrackedRun) -> dict[str, Any] | None:
        """Open the tracker's run; return what to remember for a resume (kept in the run folder)."""
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record one metrics.jsonl record's scalars at `step` (the optimizer step)."""
        raise NotImplementedError

    def finish(self, status: Status) -> None:
        """Close the run: all steps trained, stopped (Ctrl-C, closed output; resumable) or failed."""


registry.trackers.base = Tracker


def register_tracker(name: str, *, options: type):
    """Class decorator: register a `Tracker` subclass as `train.track.<name>` with its options."""
    return registry.trackers.register(name, options=options)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of one metrics.jsonl record, keyed `<type>/<key>` and, for the routing
    statistics of each MoE layer, `<type>/<layer>/<key>`. Lists (per-expert loads) stay in
    metrics.jsonl."""
    prefix = record.get("type", "train")
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)

    for key, value in record.items():
        if key in ("type", "step"):
            continue
        if key == "layers" and isinstance(value, dict):
            for layer, stats in value.items():
                if isinstance(stats, dict):
                    for k, v in stats.items():
                        put(f"{prefix}/{layer}/{k}", v)
        else:
            put(f"{prefix}/{key}", value)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as dotted keys (`model.moe.router.kind`), for trackers whose parameters are flat."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def _needs(module: str, extra: str, key: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MoectlError(f"train.track.{key} needs the {module} package",
                          hint=f"{install_hint(extra)}, or remove train.track.{key}") from None


# --------------------------------------------------------------------------- Weights & Biases


@dataclass
class WandbOptions:
    project: str = option("moectl", "W&B project.")
    entity: str | None = option(None, "W&B entity (team or user); null: your default.")
    mode: Literal["offline", "online"] = option(
        "offline", "offline: write the run under <run>/tracking/wandb, for `wandb sync` later (no network, no "
        "account); online: stream to the W&B server as it trains (after `wandb login`).")
    group: str | None = option(None, "W&B group; null: the recipe's name, so the seeds of one recipe group together.")
    tags: list[str] = option(help="W&B tags.", factory=list)


@register_tracker("wandb", options=WandbOptions)
class WandbTracker(Tracker):
    """Weights & Biases (moectl's `wandb` extra)."""

    def start(self, run: TrackedRun) -> dict[str, Any]:
        wandb = _needs("wandb", "wandb", "wandb")
        o = self.options
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=o.project, entity=o.entity, mode=o.mode, group=o.group or run.recipe_name, tags=o.tags or None,
            name=run.name, id=run.state.get("id"), resume="allow" if run.state.get("id") else None,
            dir=str(run.folder.parent), config={**run.config, "provenance": run.provenance},
            settings=wandb.Settings(console="off", save_code=False, silent=True))
        return {"id": self.run.id}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, status: Status) -> None:
        self.run.finish(exit_code={"finished": 0, "stopped": 130, "failed": 1}[status])


# --------------------------------------------------------------------------- MLflow


@dataclass
class MlflowOptions:
    tracking_uri: str | None = option(
        None, "Where MLflow stores the run: a database URI (sqlite:///runs/mlflow.db to keep every run in one store) "
        "or a tracking server's http(s) URL. null: $MLFLOW_TRACKING_URI if set, else "
        "sqlite:///<run>/tracking/mlflow/mlflow.db.")
    experiment: str = option("moectl", "MLflow experiment (created when missing).")


_MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


@register_tracker("mlflow", options=MlflowOptions)
class MlflowTracker(Tracker):
    """MLflow (moectl's `mlflow` extra): metrics with their steps, the recipe as parameters, the
    reproducibility record as tags."""

    def start(self, run: TrackedRun) -> dict[str, Any]:
        _needs("mlflow", "mlflow", "mlflow")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        # A tracking server that does not answer fails in seconds, not after MLflow's default 7 retries
        # with doubling waits (over four minutes of a stalled training); the environment can say otherwise.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        for name in ("mlflow", "alembic"):   # their start-up chatter is not moectl's output
            logging.getLogger(name).setLevel(logging.WARNING)
        self.Metric = Metric
        # A resumed run goes back to the store it started in; the default store moves with the folder.
        uri = run.state.get("tracking_uri") or self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        kept_uri = uri
        artifacts = None
        if not uri:
            run.folder.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(run.folder / 'mlflow.db').resolve()}"
            artifacts = (run.folder / "artifacts").resolve().as_uri()
        if uri.startswith("sqlite:"):    # MLflow's database stores need these beside mlflow-skinny
            _needs("sqlalchemy", "mlflow", "mlflow")
            _needs("alembic", "mlflow", "mlflow")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = run.state.get("run_id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(self.options.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                self.options.experiment, artifact_location=artifacts)
            tags = {"mlflow.runName": run.name, "moectl.recipe": run.recipe_name,
                    **{f"moectl.{k}": str(v)[:5000] for k, v in flat_config(run.provenance).items()}}
            run_id = self.client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flat_config(run.config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i:i + 100], tags=[] if i else [RunTag("moectl", "1")])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return {"run_id": run_id, **({"tracking_uri": kept_uri} if kept_uri else {})}

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS[status])


# --------------------------------------------------------------------------- the trackers of a run


def sections(track: Any) -> dict[str, Any]:
    """The options of each tracker a recipe's `train.track` switches on (name -> options instance)."""
    if track is None:
        return {}
    return {name: registry.trackers.get(name).options(**section.model_dump())
            for name, section in track if section is not None}


class Trackers:
    """The trackers a recipe switched on, for one run. A tracker that fails to start stops the
    run before training (a clear error); one that fails later is reported once on stderr and
    left out, and training goes on (metrics.jsonl has every record)."""

    def __init__(self, sections: dict[str, Any]):
        self.active: list[tuple[str, Tracker]] = []
        self.sections = sections

    def start(self, run: TrackedRun, saved: dict[str, Any]) -> dict[str, Any]:
        """Start each tracker; returns the state to keep in the run folder (tracker name -> state)."""
        state = dict(saved)
        for name, options in self.sections.items():
            entry = registry.trackers.get(name)
            tracker = entry.cls(options)
            kept_state = saved.get(name) or {}
            if not isinstance(kept_state, dict):
                self.finish("failed")
                raise MoectlError(f"{run.folder / 'state.json'} is damaged ({name}: not an object)", hint=RESTART)
            try:
                kept = tracker.start(replace(run, folder=run.folder / name, state=dict(kept_state)))
            except MoectlError:
                self.finish("failed")
                raise
            except Exception as e:
                self.finish("failed")
                hint = f"check train.track.{name}, or remove it to train without it"
                if kept_state:
                    hint += f"; if its earlier run is gone, {RESTART}"
                raise MoectlError(f"the {name} tracker could not start: {type(e).__name__}: {e}", hint=hint) from None
            state[name] = kept or {}
            self.active.append((name, tracker))
        return state

    def log(self, record: dict[str, Any]) -> None:
        if not self.active or "step" not in record:
            return
        values = scalars(record)
        for name, tracker in list(self.active):
            try:
                tracker.log(int(record["step"]), values)
            except Exception as e:
                self._drop(name, tracker, e)

    def finish(self, status: Status) -> None:
        for name, tracker in list(self.active):
            try:
                tracker.finish(status)
            except Exception as e:
                self._drop(name, tracker, e)
        self.active = []

    def _drop(self, name: str, tracker: Tracker, error: Exception) -> None:
        self.active = [(n, t) for n, t in self.active if t is not tracker]
        print(f"warning: the {name} tracker failed ({type(error).__name__}: {error}); training goes on without it "
              "and logs/metrics.jsonl keeps every record", file=sys.stderr)
