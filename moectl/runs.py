"""Run folders: from a run (or one of its checkpoints) to the recipe, model, tokenizer and step.

    runs/<name>/config.yaml, tokenizer.json, checkpoints/step-NNNNNNNN/, checkpoints/latest

`load_run` is the one way a job that only needs a trained model (evaluation, generation,
conversion, profiling a run) gets it: the model is built on the meta device and the checkpoint's
tensors are assigned to it, so nothing is initialised and then overwritten, and no random
generator, optimizer or trainer state is touched. Resuming training is the trainer's business
(`moectl.checkpoint.restore_training_state`); the run-folder rules it shares (which checkpoint
`--resume` means, whether a recipe may continue a run) are here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moectl.checkpoint import CheckpointDir, is_checkpoint, load_weights, step_of
from moectl.errors import Issue, MoectlError, RecipeError

if TYPE_CHECKING:
    import torch

    from moectl.core import MoETransformer
    from moectl.data.tokenizer import Tokenizer
    from moectl.recipe.schema import Recipe

RUN_HINT = "give a run folder written by `moectl train` (runs/<name>), one of its checkpoints/step-* folders, " \
           "or its checkpoints/latest file"


@dataclass
class Run:
    """A trained model and what it came with."""

    recipe: Recipe
    model: MoETransformer          # in eval mode
    tokenizer: Tokenizer | None    # None when the folder holds none (e.g. `moectl build --save`)
    step: int | None               # None for a folder that is not a step-* checkpoint
    checkpoint: Path               # the folder the weights came from
    run_dir: Path | None           # the run folder, when the checkpoint sits in one


def find_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None) for a run folder (its latest checkpoint, or `step`),
    a checkpoint folder, or a run's checkpoints/latest file."""
    p = Path(path)
    if not p.exists():
        raise MoectlError(f"no such run or checkpoint: {path}", hint=RUN_HINT)
    if p.is_file() and p.name == "latest" and p.parent.name == "checkpoints":
        p = p.parent.parent
    elif p.is_file():
        raise MoectlError(f"{path} is a file, not a run folder or a checkpoint", hint=RUN_HINT)
    has_checkpoints = (p / "checkpoints" / "latest").is_file()
    if (p / "model.safetensors").is_file() and not has_checkpoints:
        # a checkpoint, `moectl build --save` or `moectl convert` folder (one whose own training has
        # written checkpoints is a run folder: its newest checkpoint is the model)
        if step_of(p) is not None and not is_checkpoint(p):
            raise MoectlError(f"{path} is an incomplete checkpoint (no meta.json: its writing was interrupted)",
                              hint="use another checkpoint of the run, e.g. the one checkpoints/latest names")
        if step is not None and step_of(p) != step:
            raise MoectlError(f"{path} is the checkpoint of step {step_of(p)}, not of step {step}",
                              hint="give the run folder together with --step, or the step's own folder")
        run = p.parent.parent if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file() else None
        return p, run
    if not ((p / "config.yaml").is_file() or (p / "checkpoints").is_dir()):
        raise MoectlError(f"{path} is not a run folder or a checkpoint (no config.yaml, checkpoints/ or "
                          "model.safetensors)", hint=RUN_HINT)
    ckpts = CheckpointDir(p / "checkpoints")
    if step is not None:
        chosen = ckpts.step_dir(step)
        if not is_checkpoint(chosen):
            have = ", ".join(str(step_of(s)) for s in ckpts.steps()) or "none"
            raise MoectlError(f"{path} has no complete checkpoint of step {step} (it has: {have})")
        return chosen, p
    latest = ckpts.latest() if ckpts.root.is_dir() else None
    if latest is None:
        raise MoectlError(f"{path} holds no checkpoint yet", hint=f"train it first: moectl train {path}")
    return latest, p


def load_run(path: str | Path, *, step: int | None = None, device: Any = None,
             dtype: torch.dtype | None = None) -> Run:
    """Load a trained model from a run folder, a checkpoint folder or a run's checkpoints/latest.

    The model is built on the meta device and the checkpoint's tensors are assigned to it on
    `device` (default CPU), cast to `dtype` if given (router weights and buffers stay fp32: router
    math is fp32 everywhere). Returns it in eval mode with its recipe, tokenizer and step. Every
    problem (not a run, no such step, a damaged file, weights that do not fit the recipe) is a
    MoectlError with exit code 2."""
    import torch

    from moectl.factory import build_model
    from moectl.recipe.load import load_recipe

    checkpoint, run_dir = find_checkpoint(path, step)
    config = (run_dir or checkpoint) / "config.yaml"
    if not config.is_file():
        raise MoectlError(f"{checkpoint} has no recipe: neither it nor a run folder around it holds config.yaml",
                          hint=RUN_HINT)
    recipe = load_recipe(config)
    device = torch.device(device or "cpu")
    model = build_model(recipe, device="meta")
    dtypes = _dtypes(model, dtype)
    load_weights(checkpoint, model, device=device, assign=True, dtypes=dtypes)
    _materialise_leftovers(model, recipe, device, dtypes)
    model.eval()
    tokenizer = None
    tok_dir = run_dir or checkpoint
    if (tok_dir / "tokenizer.json").is_file():
        from moectl.data.tokenizer import load_run_tokenizer

        tok_cfg = recipe.data.tokenizer
        tokenizer = load_run_tokenizer(tok_dir, getattr(tok_cfg, "eot_token", None))
    return Run(recipe, model, tokenizer, step_of(checkpoint), checkpoint, run_dir)


def _materialise_leftovers(model, recipe: Recipe, device, dtypes: dict[str, Any] | None) -> None:
    """Tensors a checkpoint does not hold (non-persistent buffers, which a part may compute when it
    is built) are still on the meta device: build the model for real once, with the random
    generators forked, and take them from there. Built-in parts have none, so this is rare."""
    from moectl.factory import build_model

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
    import torch

    from moectl.core.accounting import component_parameters

    if dtype is None:
        return None
    return {name: torch.float32 if component == "router" else dtype
            for name, t, component, _ in component_parameters(model, buffers=True) if t.dtype.is_floating_point}


# --------------------------------------------------------------------------- resuming a run


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a training run continues from: `auto` (the run's latest, if any), `never`
    (none; refuses a run that already has checkpoints), or a checkpoint or run folder."""
    ckpts = CheckpointDir(run_dir / "checkpoints")
    if resume == "never":
        if ckpts.steps() or ckpts.latest_file.exists():
            raise MoectlError(f"{run_dir} already holds checkpoints",
                              hint="continue it with --resume auto, or start elsewhere with --run-dir")
        return None
    if resume == "auto":
        return ckpts.latest()
    path = Path(resume)
    if path.is_dir() and not is_checkpoint(path):
        inner = CheckpointDir(path / "checkpoints").latest() if (path / "checkpoints").is_dir() else None
        if inner is None:
            raise MoectlError(f"--resume {resume}: not a checkpoint or a run folder with checkpoints")
        return inner
    if not is_checkpoint(path):
        raise MoectlError(f"--resume {resume}: no complete checkpoint there",
                          hint="give a step-* folder, a run folder, or use --resume auto")
    return path


def check_same_run(run_dir: Path, recipe: Recipe, sections: tuple[str, ...] = ("model", "data", "seed")) -> None:
    """Resuming with a different model or data would silently train something else: refuse,
    naming the keys that differ. The run's config.yaml is read as a recipe, so keys a newer moectl
    added (with their defaults) do not count as differences; it is compared as resolved data, with
    keys that are null on either side left out (a section that is off, written or not) and bare
    kind names written out."""
    import yaml

    from moectl.recipe.load import expand_bare_kinds, load_recipe, resolved

    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return
    try:
        old = json.loads(json.dumps(resolved(load_recipe(old_path))))
    except MoectlError:   # a config.yaml this moectl cannot validate (a plugin gone, say): as written
        try:
            old = yaml.safe_load(old_path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise MoectlError(f"{old_path} cannot be read ({type(e).__name__})",
                              hint="restore the run's config.yaml, or start a new run with --run-dir") from None
        old = old if isinstance(old, dict) else {}
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
            issues.append(Issue(section, f"differs from {old_path} ({', '.join(keys[:4])}{more})"))
    if issues:
        raise RecipeError(str(run_dir), issues, hint="resume with the recipe the run was started with, "
                          "or start a new run with --run-dir")


# Keys that choose how the same model is computed (kernels, compilation), not what is trained.
COMPUTE_ONLY_KEYS = (("model", "moe", "backend"), ("train", "compile"))


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
