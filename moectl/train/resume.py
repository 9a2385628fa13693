"""How a training run starts, as plain functions over its run folder: from scratch or from which
checkpoint, with which recipe and budget, and whether the run folder may be continued at all.

    start = plan_start(RunDir("runs/x"), recipe, resume="auto", world=2, log=print)

`plan_start` decides from the recipe and the run folder alone, which every process reads alike,
so every process of a run decides the same. A resumed run keeps the model, data and seed its
folder was started with (`check_same_run`), the global batch its checkpoint was trained with
(`keep_global_batch`, which returns a new recipe) and the tokenizer its tokens were made with
(`check_tokenizers`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moectl.errors import Issue, MoectlError, RecipeError
from moectl.recipe.load import expand_bare_kinds, load_recipe, resolved
from moectl.recipe.schema import Recipe
from moectl.rundir import CheckpointDir, ModelFolder, RunDir
from moectl.runs import find_checkpoint

# Keys that choose how the same model is computed (kernels, compilation), not what is trained.
COMPUTE_ONLY_KEYS = (("model", "moe", "backend"), ("train", "compile"))


@dataclass
class Start:
    """Where a training run starts."""

    recipe: Recipe                     # what to train (train.grad_accum set to keep a resumed run's global batch)
    checkpoint: Path | None            # the checkpoint to resume from (None: a fresh start)
    tokens_per_step: int               # of the global batch
    total_steps: int


def total_steps(recipe: Recipe, tokens_per_step: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    raise RecipeError("recipe", [Issue("train.max_steps", "training needs a budget: set train.max_steps "
                                                          "or train.max_tokens")])


def check_run_folder(run: RunDir) -> None:
    """A training writes only into a new or empty folder or a run: never among someone's files."""
    foreign = run.foreign_entries()
    if foreign:
        raise MoectlError(f"{run.path} holds files that are not a run's ({', '.join(foreign[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}), and a training writes config.yaml, logs/ and "
                          "checkpoints/ there", hint="give --run-dir a new or empty folder, or an existing run")


def plan_start(run: RunDir, recipe: Recipe, resume: str, world: int, log: Callable[[str], Any]) -> Start:
    """The checkpoint `resume` means for this run (checked against the run folder), the recipe
    that continues it, and the budget in steps of the global batch."""
    checkpoint = resume_point(run, resume)
    if checkpoint is not None:
        check_same_run(run, recipe)
        source = RunDir.of_checkpoint(checkpoint)
        if source is not None and source.path.resolve() != run.path.resolve():
            check_same_run(source, recipe, sections=("model",))   # new data or seed is fine
        saved = recoverable(checkpoint, ModelFolder(checkpoint).read_trainer_state)
        recipe = keep_global_batch(recipe, saved, world, checkpoint, log)
    t = recipe.train
    tokens_per_step = t.batch_size * t.grad_accum * world * recipe.model.seq_len
    return Start(recipe, checkpoint, tokens_per_step, total_steps(recipe, tokens_per_step))


def resume_point(run: RunDir, resume: str) -> Path | None:
    """The checkpoint a training run continues from: `auto` (the run's latest, if any), `never`
    (none; refuses a run that already has checkpoints), or a checkpoint or run folder."""
    ckpts = run.checkpoints
    if resume == "never":
        if ckpts.any():
            raise MoectlError(f"{run.path} already holds checkpoints",
                              hint="continue it with --resume auto, or start elsewhere with --run-dir")
        return None
    if resume == "auto":
        return ckpts.latest()
    path = Path(resume)
    if path.is_dir() and not ModelFolder(path).complete():
        other = RunDir(path)
        inner = other.checkpoints.latest() if other.checkpoints.root.is_dir() else None
        if inner is None:
            raise MoectlError(f"--resume {resume}: not a checkpoint or a run folder with checkpoints")
        return inner
    if not ModelFolder(path).complete():
        raise MoectlError(f"--resume {resume}: no complete checkpoint there",
                          hint="give a step-* folder, a run folder, or use --resume auto")
    return path


def recoverable(checkpoint: Path, read: Callable[[], Any]) -> Any:
    """`read()` of `checkpoint`, with a damaged checkpoint's error naming the run's newest other
    complete checkpoint (in the same checkpoints/ folder) and how to resume from it."""
    try:
        return read()
    except MoectlError as e:
        raise MoectlError(e.message, hint=CheckpointDir(Path(checkpoint).parent).recovery_hint(checkpoint),
                          exit_code=e.exit_code) from None


def keep_global_batch(recipe: Recipe, saved: dict[str, Any], world: int, checkpoint: Path,
                      log: Callable[[str], Any]) -> Recipe:
    """A resumed run keeps the global batch its checkpoint was trained with (so its data order
    and schedule stay those of the run): the returned recipe's train.grad_accum follows the
    process count, or the resume is refused with the arithmetic."""
    cfg = recipe.train
    saved_global = saved.get("global_batch")
    if not isinstance(saved_global, int) or saved_global < 1:
        return recipe   # a checkpoint from before the global batch was recorded
    if cfg.batch_size * cfg.grad_accum * world == saved_global:
        return recipe
    per_micro = cfg.batch_size * world
    was = (f"{saved.get('batch_size', '?')} sequences x {saved.get('grad_accum', '?')} micro-batches "
           f"x {saved.get('world_size', '?')} processes")
    if saved_global % per_micro:
        raise MoectlError(
            f"{checkpoint} was trained with a global batch of {saved_global} sequences ({was}); with "
            f"{world} processes of train.batch_size {cfg.batch_size} ({per_micro} per micro-batch) no whole "
            f"number of micro-batches gives {saved_global}",
            hint=f"resume with --nproc {saved.get('world_size', '?')}, or set train.batch_size so that "
                 f"batch_size x processes divides {saved_global}")
    accum = saved_global // per_micro
    log(f"keeping the run's global batch of {saved_global} sequences ({was}): train.grad_accum = {accum} "
        f"with {world} processes")
    return recipe.model_copy(update={"train": cfg.model_copy(update={"grad_accum": accum})})


def budget_before(checkpoint: Path, tokens_per_step: int, default: int) -> int:
    """The budget a checkpoint without saved schedule segments was trained towards: its run's
    config.yaml says (read before this run rewrites it); else `default`."""
    source = RunDir.of_checkpoint(checkpoint)
    try:
        old = source.read_config()["train"] if source is not None else {}
    except (MoectlError, KeyError):
        return default
    steps, tokens = (old.get("max_steps"), old.get("max_tokens")) if isinstance(old, dict) else (None, None)
    if isinstance(steps, int) and steps > 0:
        return steps
    if isinstance(tokens, int) and tokens > 0:
        return max(1, math.ceil(tokens / tokens_per_step))
    return default


# --------------------------------------------------------------------------- the same run


def check_same_run(run: RunDir, recipe: Recipe, sections: tuple[str, ...] = ("model", "data", "seed")) -> None:
    """Resuming with a different model or data would silently train something else: refuse,
    naming the keys that differ. The run's config.yaml is read as a recipe, so keys a newer moectl
    added (with their defaults) do not count as differences; it is compared as resolved data, with
    keys that are null on either side left out (a section that is off, written or not) and bare
    kind names written out."""
    if not run.config.is_file():
        return
    try:
        old = json.loads(json.dumps(resolved(load_recipe(run.config))))
    except MoectlError:   # a config.yaml this moectl cannot validate (a plugin gone, say): as written
        try:
            old = run.read_config()
        except MoectlError as e:
            raise MoectlError(e.message, hint="restore the run's config.yaml, or start a new run with "
                                              "--run-dir") from None
        expand_bare_kinds(old, {})
    new = json.loads(json.dumps(resolved(recipe)))
    for tree in (old, new):   # how the numbers are computed, not which: free to change on resume
        for path in COMPUTE_ONLY_KEYS:
            _drop(tree, path)
    issues = []
    for section in sections:
        a, b = _without_nulls(old.get(section)), _without_nulls(new.get(section))
        if a != b:
            keys = _differences(a, b, section)
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            issues.append(Issue(section, f"differs from {run.config} ({', '.join(keys[:4])}{more})"))
    if issues:
        raise RecipeError(str(run.path), issues, hint="resume with the recipe the run was started with, "
                          "or start a new run with --run-dir")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _drop(tree: Any, path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        tree = tree.get(key) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(path[-1], None)


def _differences(a: Any, b: Any, path: str) -> list[str]:
    """The dotted keys where two resolved values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                out += _differences(a.get(k), b.get(k), f"{path}.{k}")
        return out
    return [f"{path}: {a!r} in the run, {b!r} now"]


# --------------------------------------------------------------------------- the tokens' meaning


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files define the same tokenizer (equal as JSON)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return json.loads(Path(a).read_text()) == json.loads(Path(b).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False


def init_source(init_from: str) -> tuple[Path, RunDir | None]:
    """(checkpoint, its run folder or None) that train.init_from names."""
    try:
        checkpoint, run = find_checkpoint(init_from)
    except MoectlError as e:
        raise MoectlError(f"train.init_from: {e.message}", hint=e.hint) from None
    return checkpoint, RunDir(run) if run is not None else None


def check_tokenizers(run: RunDir, tokenizer: Path, start: Start) -> None:
    """The tokens of a run keep their meaning: the data's `tokenizer` must be the one the run (and
    the run it resumes from, or whose weights it starts from) was trained with."""
    theirs = []
    if run.tokenizer.is_file() and (start.checkpoint is not None or run.checkpoints.steps()):
        theirs.append(("this run", run.tokenizer))
    init_from = start.recipe.train.init_from
    if start.checkpoint is not None:
        source = RunDir.of_checkpoint(start.checkpoint)
        if source is not None and source.tokenizer.is_file() and source.tokenizer.resolve() != run.tokenizer.resolve():
            theirs.append((f"the run of --resume {start.checkpoint}", source.tokenizer))
    elif init_from:
        checkpoint, source_run = init_source(init_from)
        source = source_run.tokenizer if source_run is not None else ModelFolder(checkpoint).tokenizer
        if source.is_file():
            theirs.append((f"train.init_from {init_from}", source))
    for what, path in theirs:
        if not same_tokenizer(path, tokenizer):
            raise MoectlError(
                f"the data's tokenizer ({tokenizer}) is not the tokenizer of {what} ({path}): token ids would "
                "change meaning (the corpus or the tokenizer settings changed since that run started)",
                hint="train on the data the run was trained on, or start a new run (--run-dir) with its own "
                     "tokenizer; to reuse that tokenizer, set data.tokenizer: {kind: file, path: " + str(path) + "}")
