"""Checkpoints: complete or absent.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  model.safetensors   full model state (weights and persistent buffers such as router biases)
  optimizer.pt        full optimizer state, keyed by parameter name (any process count can load it)
  trainer.json        step, tokens seen, scheduler state, data position, and what the method needs
  rng/rank-R.pt       each process's random generators
  extra.pt            method state that is not in the model (e.g. CompeteSMoE's schedule), if any
  meta.json           written last inside the folder; its presence marks the folder complete
It is written under a temporary name, synced, and renamed into place; only then is
`checkpoints/latest` (a one-line file naming the folder) replaced, atomically. A process killed at
any moment leaves `latest` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moectl.errors import MoectlError
from moectl.fsutil import atomic_dir, atomic_write_text, fsync_dir, fsync_tree
from moectl.recipe.load import dump_recipe
from moectl.recipe.schema import Recipe

STEP_DIR = re.compile(r"^step-(\d{8})$")
SAME_MODEL_HINT = "the recipe's model section must be the one the checkpoint was trained with"


def save_initial(recipe: Recipe, target: Path) -> None:
    """An initialised model (from the recipe's seed) and its resolved recipe, written atomically."""
    from safetensors.torch import save_model

    from moectl.factory import build_model

    model = build_model(recipe)
    with atomic_dir(Path(target)) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(dump_recipe(recipe))


# --------------------------------------------------------------------------- state helpers


def _dedupe_shared(state: dict[str, Any]) -> dict[str, Any]:
    """Drop aliases of tensors that appear twice (tied weights); safetensors stores each once."""
    out, seen = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.contiguous()
    return out


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- folders


@dataclass
class CheckpointDir:
    """The checkpoints/ folder of a run."""

    root: Path

    @property
    def latest_file(self) -> Path:
        return self.root / "latest"

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, following `latest`."""
        if not self.latest_file.is_file():
            return None
        name = self.latest_file.read_text().strip()
        path = self.root / name
        if not (path / "meta.json").is_file():
            raise MoectlError(f"{self.latest_file} names {name}, which is not a complete checkpoint",
                              hint="point `latest` at a complete step-* folder, or resume from one with --resume PATH")
        return path

    def steps(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if STEP_DIR.match(p.name) and (p / "meta.json").is_file())

    def clean_temporaries(self) -> None:
        """Remove half-written checkpoints left by a killed process."""
        for p in self.root.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def release(self, path: Path) -> None:
        """Before `path` is replaced: if `latest` names it, point `latest` at the newest other
        complete checkpoint (or remove it when there is none), so it never names a missing folder."""
        if not self.latest_file.is_file() or self.latest_file.read_text().strip() != path.name:
            return
        others = [p for p in self.steps() if p != path]
        if others:
            atomic_write_text(self.latest_file, others[-1].name + "\n")
        else:
            self.latest_file.unlink()
        fsync_dir(self.root)

    def prune(self, keep_last: int) -> None:
        latest = self.latest()
        for p in self.steps()[:-keep_last]:
            if p != latest:
                shutil.rmtree(p, ignore_errors=True)


def is_checkpoint(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "model.safetensors").is_file()


# --------------------------------------------------------------------------- save / load


def save_checkpoint(ckpts: CheckpointDir, step: int, model, optimizer, trainer: dict[str, Any],
                    meta: dict[str, Any], *, rank: int, world_size: int, barrier, keep_last: int,
                    extra: dict[str, Any] | None = None) -> Path:
    """Collective: every process calls it. Rank 0 writes model, optimizer and trainer state; every
    rank writes its RNG state; rank 0 then publishes the folder and moves `latest`."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    final = ckpts.step_dir(step)
    tmp = ckpts.root / f".{final.name}.tmp-shared"
    if rank == 0:
        ckpts.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank}.pt")
    barrier()
    if rank == 0:
        try:
            save_file(_dedupe_shared(model_state), str(tmp / "model.safetensors"))
            torch.save(optim_state, tmp / "optimizer.pt")
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2))
            if extra:
                torch.save(extra, tmp / "extra.pt")
            delay = float(os.environ.get("MOECTL_CHECKPOINT_DELAY", "0"))  # fault-injection for tests
            if delay:
                time.sleep(delay)
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world_size,
                                                       "time": time.time()}, indent=2))
            fsync_tree(tmp)
            if final.exists():  # a checkpoint of this step from an earlier attempt
                ckpts.release(final)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(ckpts.root)
            atomic_write_text(ckpts.latest_file, final.name + "\n")
            ckpts.prune(keep_last)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    barrier()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer.json").read_text())


def load_checkpoint(path: Path, model, optimizer=None, *, rank: int = 0) -> dict[str, Any]:
    """Load a checkpoint into a (possibly wrapped) model and optimizer; restore this rank's RNG.
    Returns the trainer state."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not is_checkpoint(path):
        raise MoectlError(f"{path} is not a complete checkpoint (no meta.json / model.safetensors)")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    state = load_file(str(path / "model.safetensors"))
    try:
        missing = set_model_state_dict(model, state, options=opts)
    except RuntimeError as e:   # shapes differ: a checkpoint of another model
        lines = str(e).splitlines()
        first = next((line.strip() for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise MoectlError(f"{path} does not match the recipe's model: {first}",
                          hint=SAME_MODEL_HINT) from None
    _check_missing(model, missing)
    if optimizer is not None:
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    rng_file = path / "rng" / f"rank-{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng" / "rank-0.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    state = read_trainer_state(path)
    if (path / "extra.pt").is_file():
        state["extra"] = torch.load(path / "extra.pt", map_location="cpu", weights_only=False)
    return state


def _check_missing(model, result) -> None:
    """Only tied aliases may be absent from the file; anything else is a mismatch."""
    missing = [k for k in getattr(result, "missing_keys", []) if not _is_tied_alias(model, k)]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise MoectlError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                          hint=SAME_MODEL_HINT)


def _is_tied_alias(model, key: str) -> bool:
    inner = getattr(model, "module", model)
    args = getattr(inner, "args", None)
    return bool(args is not None and args.tie_embeddings and key.endswith("head.weight"))
