"""From a run (or one of its checkpoints, or a model folder) to the recipe, model, tokenizer and step.

`load_run` is the one way a job that only needs a trained model (evaluation, generation,
conversion, profiling a run) gets it: the model is built on the meta device and the checkpoint's
tensors are assigned to it, so nothing is initialised and then overwritten, and no random
generator, optimizer or trainer state is touched. Resuming training is the trainer's business
(`moectl.train.resume`, `moectl.checkpoint.restore_training_state`). The files themselves are
`moectl.rundir`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moectl.checkpoint import load_weights
from moectl.core.accounting import component_parameters
from moectl.core.model import MoETransformer
from moectl.data.tokenizer import Tokenizer, load_run_tokenizer
from moectl.errors import MoectlError
from moectl.factory import build_model
from moectl.recipe.load import load_recipe
from moectl.recipe.schema import Recipe
from moectl.rundir import RUN_HINT, ModelFolder, RunDir


@dataclass
class Run:
    """A trained model and what it came with."""

    recipe: Recipe
    model: MoETransformer          # in eval mode
    tokenizer: Tokenizer | None    # None when the folder holds none (e.g. `moectl build --save`)
    step: int | None               # None for a folder that is not a step-* checkpoint
    checkpoint: Path               # the folder the weights came from
    run_dir: Path | None           # the run folder, when the checkpoint sits in one

    @property
    def home(self) -> RunDir | ModelFolder:
        """The run folder, else the checkpoint or model folder itself: where the recipe and the
        tokenizer are, and where `moectl eval` writes by default."""
        return RunDir(self.run_dir) if self.run_dir is not None else ModelFolder(self.checkpoint)


def find_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None) for a run folder (its latest checkpoint, or `step`),
    a checkpoint folder, or a run's checkpoints/latest file."""
    p = Path(path)
    if not p.exists():
        raise MoectlError(f"no such run or checkpoint: {path}", hint=RUN_HINT)
    owner = RunDir.of_latest_file(p) if p.is_file() else None
    if owner is not None:
        p = owner.path
    elif p.is_file():
        raise MoectlError(f"{path} is a file, not a run folder or a checkpoint", hint=RUN_HINT)
    run, folder = RunDir(p), ModelFolder(p)
    if folder.has_weights() and not run.has_latest():
        # a checkpoint, `moectl build --save` or `moectl convert` folder (one whose own training has
        # written checkpoints is a run folder: its newest checkpoint is the model)
        if folder.step is not None and not folder.complete():
            raise MoectlError(f"{path} is an incomplete checkpoint (no meta.json: its writing was interrupted)",
                              hint="use another checkpoint of the run, e.g. the one checkpoints/latest names")
        if step is not None and folder.step != step:
            raise MoectlError(f"{path} is the checkpoint of step {folder.step}, not of step {step}",
                              hint="give the run folder together with --step, or the step's own folder")
        around = RunDir.of_checkpoint(p)
        return p, around.path if around is not None else None
    if not run.looks_like_run():
        raise MoectlError(f"{path} is not a run folder or a checkpoint (no config.yaml, checkpoints/ or "
                          "model.safetensors)", hint=RUN_HINT)
    ckpts = run.checkpoints
    if step is not None:
        chosen = ckpts.step_dir(step)
        if not ModelFolder(chosen).complete():
            have = ", ".join(str(ModelFolder(s).step) for s in ckpts.steps()) or "none"
            raise MoectlError(f"{path} has no complete checkpoint of step {step} (it has: {have})")
        return chosen, p
    latest = ckpts.latest() if ckpts.root.is_dir() else None
    if latest is None:
        raise MoectlError(f"{path} holds no checkpoint yet", hint=f"train it first: moectl train {path}")
    return latest, p


def load_run(path: str | Path, *, step: int | None = None, device: Any = None,
             dtype: torch.dtype | None = None, weights: bool = True) -> Run:
    """Load a trained model from a run folder, a checkpoint folder or a run's checkpoints/latest.

    The model is built on the meta device and the checkpoint's tensors are assigned to it on
    `device` (default CPU), cast to `dtype` if given (router weights and buffers stay fp32: router
    math is fp32 everywhere). Returns it in eval mode with its recipe, tokenizer and step. Every
    problem (not a run, no such step, a damaged file, weights that do not fit the recipe) is a
    MoectlError with exit code 2."""
    checkpoint, run_dir = find_checkpoint(path, step)
    home = RunDir(run_dir) if run_dir is not None else ModelFolder(checkpoint)
    if not home.config.is_file():
        raise MoectlError(f"{checkpoint} has no recipe: neither it nor a run folder around it holds config.yaml",
                          hint=RUN_HINT)
    recipe = load_recipe(home.config)
    device = torch.device(device or "cpu")
    model = build_model(recipe, device="meta")
    if weights:   # else the model stays on the meta device: its structure, no tensors (streaming export)
        dtypes = _dtypes(model, dtype)
        load_weights(checkpoint, model, device=device, assign=True, dtypes=dtypes)
        _materialise_leftovers(model, recipe, device, dtypes)
    model.eval()
    tokenizer = None
    if home.tokenizer.is_file():
        tokenizer = load_run_tokenizer(home.tokenizer, getattr(recipe.data.tokenizer, "eot_token", None),
                                       getattr(recipe.data.tokenizer, "add_special_tokens", False))
        if tokenizer.vocab_size > model.args.vocab_size:
            raise MoectlError(f"{home.tokenizer} has {tokenizer.vocab_size:,} tokens but the model has "
                              f"{model.args.vocab_size:,} (model.vocab_size): its ids would not fit the embedding",
                              hint="the tokenizer does not belong to this model: restore the run's own tokenizer.json")
    return Run(recipe, model, tokenizer, ModelFolder(checkpoint).step, checkpoint, run_dir)


def _materialise_leftovers(model, recipe: Recipe, device, dtypes: dict[str, Any] | None) -> None:
    """Tensors a checkpoint does not hold (non-persistent buffers, which a part may compute when it
    is built) are still on the meta device: build the model for real once, with the random
    generators forked, and take them from there. Built-in parts have none, so this is rare."""
    left = [name for name, t in model.named_buffers() if t.is_meta]
    if not left:
        return
    real = dict(build_model(recipe).named_buffers())   # build_model forks the random generators
    for name in left:
        owner, _, attr = name.rpartition(".")
        value = real[name].to(device)
        if dtypes and name in dtypes:
            value = value.to(dtypes[name])
        setattr(model.get_submodule(owner) if owner else model, attr, value)


def _dtypes(model, dtype) -> dict[str, Any] | None:
    """Target dtype per floating tensor: `dtype`, except fp32 for everything of a router."""
    if dtype is None:
        return None
    return {name: torch.float32 if component == "router" else dtype
            for name, t, component, _ in component_parameters(model, buffers=True) if t.dtype.is_floating_point}


def folder_record(run: Run, which: str) -> dict[str, Any] | None:
    """A JSON record a converted model folder keeps beside its weights (`which`: "convert_info" for
    convert.json, "text_settings" for text.json), from the checkpoint folder or else the run folder
    that trained it further; None when there is none, or it is damaged or not an object."""
    for folder in (run.checkpoint, run.run_dir):
        if folder is None:
            continue
        path = getattr(ModelFolder(folder), which)
        try:
            record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, ValueError):
            record = None
        if isinstance(record, dict):
            return record
    return None
