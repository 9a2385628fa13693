"""Run folders and model folders: the one module that knows their file names and formats.

    runs/<name>/                  a run folder (`RunDir`)
      config.yaml                 the resolved recipe
      tokenizer.json              the run's tokenizer
      data.json                   what the data was (the prepared data's index)
      .lock                       held while a training writes (moectl.train.lock)
      logs/metrics.jsonl          one JSON object per logged step and per evaluation
      logs/summary.json           the training summary, written at the end
      tb/                         TensorBoard, when enabled
      tracking/                   the experiment trackers' own files (train.track), and state.json:
                                  each tracker's run id, so that a resumed run continues it
      eval/results.json           `moectl eval`, and its PNG plots (EVAL_PLOTS)
      checkpoints/latest          names the newest complete checkpoint (`CheckpointDir`)
      checkpoints/step-NNNNNNNN/  a checkpoint (`ModelFolder`)

    a model folder (`ModelFolder`): a checkpoint, or what `moectl build --save` and `moectl convert`
    write
      model.safetensors           the model's tensors
      optimizer.pt, trainer.json, plan.pt, rng/rank-R.pt   training state (checkpoints only)
      meta.json                   written last: a checkpoint without it is incomplete
      config.yaml, tokenizer.json, convert.json            (build and convert folders)

Every job reads and writes these files through this module. JSON is written with moectl's one rule
for non-finite numbers (null, `moectl.fsutil.json_safe`); a metrics log is read with one rule for a
torn last line (`read_metrics`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moectl.errors import MoectlError
from moectl.fsutil import atomic_copy, atomic_write_text, fsync_dir, json_safe, write_json

CONFIG, TOKENIZER, DATA_INDEX, LOCK = "config.yaml", "tokenizer.json", "data.json", ".lock"
LOGS, METRICS, SUMMARY, TENSORBOARD = "logs", "metrics.jsonl", "summary.json", "tb"
TRACKING, TRACKING_STATE = "tracking", "state.json"
EVAL, RESULTS = "eval", "results.json"
CURVES = "curves.png"   # validation curves, in eval/ and in a comparison's folder
EVAL_PLOTS = {"expert_load": "expert_load.png", "router_entropy": "router_entropy.png",
              "mutual_information": "mutual_information.png", "curves": CURVES}
CHECKPOINTS, LATEST = "checkpoints", "latest"
WEIGHTS, OPTIMIZER, TRAINER, PLAN, META, RNG = (
    "model.safetensors", "optimizer.pt", "trainer.json", "plan.pt", "meta.json", "rng")
CONVERT_INFO = "convert.json"
TEXT_SETTINGS = "text.json"   # an imported model's text settings (special tokens, chat template, generation)
STEP_DIR = re.compile(r"^step-(\d{8})$")
# eval/results.json: its format name, and the newest version this moectl writes and reads
RESULTS_FORMAT, RESULTS_VERSION = "moectl.eval", 2   # 2: variant_agreement; non-finite numbers as null

RUN_HINT = ("give a run folder written by `moectl train` (runs/<name>), one of its checkpoints/step-* folders, "
            "or its checkpoints/latest file")


DAMAGED_HINT = "restore the file, or leave that run out of the comparison"
METRICS_HINT = ("the log was changed by something other than moectl: restore it, or remove the damaged line, "
                "then run again")


def default_run_path(name: str, seed: int | None = None) -> Path:
    """The default run folder: runs/<name>, or runs/<name>-seed<S> for a seed other than the
    recipe's own (so that the seeds of one recipe never share a folder)."""
    return Path("runs") / (name if seed is None else f"{name}-seed{seed}")


def damaged(path: Path, why: str, hint: str = DAMAGED_HINT) -> MoectlError:
    return MoectlError(f"{path} is damaged ({why})", hint=hint)


def read_json(path: Path, hint: str = DAMAGED_HINT) -> dict[str, Any]:
    """A JSON object from a file; a clear error if it cannot be read or is not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(path, type(e).__name__, hint) from None
    except json.JSONDecodeError as e:
        raise damaged(path, f"not JSON: {e.msg} at line {e.lineno}", hint) from None
    except RecursionError:
        raise damaged(path, "its JSON nests too deeply", hint) from None
    if not isinstance(data, dict):
        raise damaged(path, "not a JSON object", hint)
    return data


def read_metrics(path: Path, hint: str = DAMAGED_HINT) -> list[dict[str, Any]]:
    """The records of a metrics log ([] without one). The one rule for a damaged log: a last line
    without its newline that is not JSON was cut short by a writer that stopped (it is left out);
    any other line that is not a JSON object is damage, an error naming the line."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(path, type(e).__name__, hint) from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == len(lines) and not line.endswith("\n"):
                break
            raise damaged(path, f"line {i} is not JSON", hint) from None
        if not isinstance(record, dict):
            raise damaged(path, f"line {i} is not a JSON object", hint)
        records.append(record)
    return records


def _count(value: Any, positive: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (value > 0 if positive else value >= 0)


def _finite(value: Any, low: float = -math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def trainer_state_problem(state: Any, folder_step: int | None) -> str | None:
    """What is wrong with a trainer.json (None: nothing). Every value the trainer uses is checked
    for type and range, and the step against the folder's name (step-NNNNNNNN)."""
    if not isinstance(state, dict):
        return "not a JSON object"
    if not _count(state.get("step")):
        return f"step is {state.get('step')!r}, not a count of steps"
    if folder_step is not None and state["step"] != folder_step:
        return f"step {state['step']} in a folder of step {folder_step}"
    for key in ("tokens", "skipped_steps", "val_tokens"):
        if key in state and not _count(state[key]):
            return f"{key} is {state[key]!r}, not a count"
    for key in ("global_batch", "batch_size", "grad_accum", "world_size"):
        if key in state and not _count(state[key], positive=True):
            return f"{key} is {state[key]!r}, not a positive count"
    if state.get("val_loss") is not None and not _finite(state["val_loss"]):
        return f"val_loss is {state['val_loss']!r}"
    data = state.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("order", ""), str)
                                 and _finite(data.get("epoch", 0), 0)):
        return f"data is {data!r}"
    schedule = state.get("schedule")
    if schedule is not None:
        if not isinstance(schedule, list):
            return "schedule is not a list"
        for seg in schedule:
            if not (isinstance(seg, dict) and _count(seg.get("start")) and _count(seg.get("total"), positive=True)
                    and (seg.get("start_lr") is None or _finite(seg["start_lr"], 0))):
                return f"schedule segment {seg!r} is not (start, total, start_lr)"
    return None


def step_of(path: Path) -> int | None:
    """The step of a step-NNNNNNNN folder (None for any other folder)."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- a model folder


@dataclass(frozen=True)
class _Folder:
    """A folder that holds a recipe (config.yaml) and maybe a tokenizer (tokenizer.json)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def eval_dir(self) -> Path:
        """Where `moectl eval` writes its results by default."""
        return self.path / EVAL


@dataclass(frozen=True)
class ModelFolder(_Folder):
    """A folder holding a model's tensors: a checkpoint (with training state), or what
    `moectl build --save` and `moectl convert` write."""

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def optimizer(self) -> Path:
        return self.path / OPTIMIZER

    @property
    def trainer(self) -> Path:
        return self.path / TRAINER

    @property
    def plan(self) -> Path:
        return self.path / PLAN

    @property
    def meta(self) -> Path:
        return self.path / META

    @property
    def convert_info(self) -> Path:
        return self.path / CONVERT_INFO

    @property
    def rng_dir(self) -> Path:
        return self.path / RNG

    def rng(self, rank: int) -> Path:
        return self.rng_dir / f"rank-{rank}.pt"

    @property
    def step(self) -> int | None:
        return step_of(self.path)

    def has_weights(self) -> bool:
        return self.weights.is_file()

    def complete(self) -> bool:
        """A checkpoint whose writing finished (meta.json is written last)."""
        return self.meta.is_file() and self.weights.is_file()

    def read_trainer_state(self) -> dict[str, Any]:
        """trainer.json: the step, tokens seen and the rest of the trainer's state."""
        try:
            state = json.loads(self.trainer.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise MoectlError(f"{self.trainer} cannot be read ({type(e).__name__}: {e})",
                              hint="resume from another checkpoint of the run") from None
        problem = trainer_state_problem(state, step_of(self.path))
        if problem:
            raise MoectlError(f"{self.trainer} is not a valid trainer state: {problem}",
                              hint="the file was changed or damaged: resume from another checkpoint of the run")
        return state

    def write_recipe(self, text: str) -> None:
        self.config.write_text(text)

    def write_convert_info(self, info: dict[str, Any]) -> None:
        write_json(self.convert_info, info)

    @property
    def text_settings(self) -> Path:
        return self.path / TEXT_SETTINGS


# --------------------------------------------------------------------------- checkpoints/


@dataclass
class CheckpointDir:
    """The checkpoints/ folder of a run: step-NNNNNNNN folders and `latest`, a one-line file that
    names the newest complete one (replaced atomically once a checkpoint is complete)."""

    root: Path

    @property
    def latest_file(self) -> Path:
        return self.root / LATEST

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def temporary(self, step: int) -> Path:
        """Where a checkpoint of `step` is written before it is renamed into place."""
        return self.root / f".{self.step_dir(step).name}.tmp-shared"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, following `latest`."""
        if not self.latest_file.is_file():
            return None
        try:
            name = self.latest_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise MoectlError(f"{self.latest_file} cannot be read ({type(e).__name__})",
                              hint=self.recovery_hint()) from None
        path = self.root / name
        if not STEP_DIR.match(name) or not ModelFolder(path).meta.is_file():
            raise MoectlError(f"{self.latest_file} names {name[:80]!r}, which is not a complete checkpoint",
                              hint=self.recovery_hint())
        return path

    def publish(self, path: Path) -> None:
        """Point `latest` at the complete checkpoint `path`."""
        atomic_write_text(self.latest_file, path.name + "\n")

    def recovery_hint(self, damaged_path: Path | None = None) -> str:
        """How to go on when a checkpoint (`damaged_path`) or `latest` cannot be used: name the
        newest other complete checkpoint, if there is one."""
        try:
            others = [p for p in self.steps()
                      if damaged_path is None or p.resolve() != Path(damaged_path).resolve()]
        except OSError:
            others = []
        if not others:
            return "no other complete checkpoint exists: start again with --resume never (in a new --run-dir)"
        return (f"the newest other complete checkpoint is {others[-1]}: resume from it with --resume {others[-1]}, "
                f"or write {others[-1].name} into {self.latest_file}")

    def steps(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        return sorted(p for p in self.root.glob("step-*") if STEP_DIR.match(p.name) and ModelFolder(p).meta.is_file())

    def any(self) -> bool:
        """Whether the folder holds a checkpoint or a `latest` file."""
        return bool(self.steps()) or self.latest_file.exists()

    def clean_temporaries(self) -> None:
        """Remove half-written checkpoints left by a killed process."""
        for p in self.root.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def temporaries(self) -> list[Path]:
        return list(self.root.glob(".step-*")) if self.root.is_dir() else []

    def release(self, path: Path) -> None:
        """Before `path` is replaced: if `latest` names it, point `latest` at the newest other
        complete checkpoint (or remove it when there is none), so it never names a missing folder."""
        if not self.latest_file.is_file() or self.latest_file.read_text().strip() != path.name:
            return
        others = [p for p in self.steps() if p != path]
        if others:
            self.publish(others[-1])
        else:
            self.latest_file.unlink()
        fsync_dir(self.root)

    def prune(self, keep_last: int) -> None:
        latest = self.latest()
        for p in self.steps()[:-keep_last]:
            if p != latest:
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- the run folder


@dataclass(frozen=True)
class RunDir(_Folder):
    """A run folder: every file of it, and how each is read and written."""

    @property
    def data_index(self) -> Path:
        return self.path / DATA_INDEX

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def metrics(self) -> Path:
        return self.path / LOGS / METRICS

    @property
    def summary(self) -> Path:
        return self.path / LOGS / SUMMARY

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING

    def read_tracking_state(self) -> dict[str, Any]:
        """Each tracker's saved state (its run id), {} before the first tracked start."""
        path = self.tracking / TRACKING_STATE
        if not path.exists():
            return {}
        return read_json(path, hint="delete it to start new tracker runs (the old ones stay where they are)")

    def write_tracking_state(self, state: dict[str, Any]) -> None:
        self.tracking.mkdir(parents=True, exist_ok=True)
        write_json(self.tracking / TRACKING_STATE, state)

    @property
    def eval_results(self) -> Path:
        return results_file(self.eval_dir)

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.path / CHECKPOINTS)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir | None:
        """The run folder a checkpoints/step-* folder sits in (None for any other folder)."""
        p = Path(checkpoint)
        if p.parent.name == CHECKPOINTS and (p.parent.parent / CONFIG).is_file():
            return cls(p.parent.parent)
        return None

    @classmethod
    def of_latest_file(cls, path: Path) -> RunDir | None:
        """The run folder of a checkpoints/latest file (None for any other file)."""
        p = Path(path)
        return cls(p.parent.parent) if p.name == LATEST and p.parent.name == CHECKPOINTS else None

    def foreign_entries(self) -> list[str]:
        """What in a folder that is not (yet) a run is not a run's own file: a training refuses to
        write among someone else's files. Empty for a new, empty or run folder."""
        if not self.path.is_dir() or self.looks_like_run():
            return []
        own = {CONFIG, TOKENIZER, DATA_INDEX, LOCK, LOGS, TENSORBOARD, TRACKING, EVAL, CHECKPOINTS}
        return sorted(p.name for p in self.path.iterdir() if p.name not in own and ".tmp-" not in p.name)

    def looks_like_run(self) -> bool:
        """Whether the folder holds a recipe or checkpoints (a run folder, maybe not trained yet)."""
        return self.config.is_file() or (self.path / CHECKPOINTS).is_dir()

    def has_latest(self) -> bool:
        """Whether training has published a checkpoint here (checkpoints/latest exists)."""
        return self.checkpoints.latest_file.is_file()

    # ----------------------------------------------------------------- config.yaml, tokenizer, data

    def read_config(self) -> dict[str, Any]:
        """config.yaml as plain data (not validated: a reader that only needs some keys)."""
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
            raise damaged(self.config, type(e).__name__) from None
        if not isinstance(config, dict):
            raise damaged(self.config, "not a recipe")
        return config

    def write_run_files(self, recipe_text: str, tokenizer: Path, data_index: dict[str, Any]) -> None:
        """config.yaml, tokenizer.json (a copy, unless it is that file already) and data.json."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, recipe_text)
        if not (self.tokenizer.exists() and self.tokenizer.samefile(tokenizer)):
            atomic_copy(tokenizer, self.tokenizer)
        write_json(self.data_index, data_index)

    # ----------------------------------------------------------------- logs

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    def keep_metrics_up_to(self, step: int) -> None:
        """Rewrite the metrics log without the records of steps after `step` (left by an attempt
        that did not reach a checkpoint), so the log holds each step once."""
        if self.metrics.is_file():
            kept = [r for r in read_metrics(self.metrics, METRICS_HINT) if r.get("step", 0) <= step]
            atomic_write_text(self.metrics, "".join(json.dumps(json_safe(r)) + "\n" for r in kept))

    def open_metrics(self):
        """The metrics log, opened for appending (its folder made)."""
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        return open(self.metrics, "a", encoding="utf-8")

    def read_summary(self) -> dict[str, Any] | None:
        """logs/summary.json, or None when the run has not finished training."""
        return read_json(self.summary) if self.summary.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summary.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.summary, summary)

    # ----------------------------------------------------------------- evaluation results

    def read_eval_results(self) -> dict[str, Any] | None:
        """eval/results.json (checked), or None when the run has not been evaluated."""
        return read_eval_results(self.eval_results) if self.eval_results.exists() else None


def results_file(folder: Path) -> Path:
    """The results.json of `moectl eval` in an output folder (a run's eval/, or --out)."""
    return Path(folder) / RESULTS


def write_eval_results(folder: Path, results: dict[str, Any]) -> Path:
    path = results_file(folder)
    write_json(path, results)
    return path


def read_eval_results(path: Path) -> dict[str, Any]:
    """An eval/results.json, checked for its format and version."""
    results = read_json(path)
    if results.get("format") != RESULTS_FORMAT:
        raise damaged(path, f"its format is {results.get('format')!r}, not {RESULTS_FORMAT!r}")
    version = results.get("version")
    if not isinstance(version, int) or version > RESULTS_VERSION:
        raise MoectlError(f"{path} has format version {version!r}; this moectl reads versions up to {RESULTS_VERSION}",
                          hint="read it with the moectl that wrote it, or rerun `moectl eval` on the run")
    return results
