"""Checkpoints: complete or absent, and nothing in them can execute code when read.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` (its file names are `moectl.rundir`'s) holding
  model.safetensors   full model state (weights and persistent buffers such as router biases)
  optimizer.pt        full optimizer state, keyed by parameter name (any process count can load it)
  trainer.json        step, tokens seen, skipped steps, data position
  rng/rank-R.pt       each process's random generators
  plan.pt             the model's routing plan (e.g. CompeteSMoE's schedule), if it has one
  meta.json           written last inside the folder; its presence marks the folder complete
The .pt files hold only tensors, numbers and strings and are read with
`torch.load(weights_only=True)`. A checkpoint is written under a temporary name, synced, and
renamed into place; only then is `checkpoints/latest` (a one-line file naming the folder)
replaced, atomically. A process killed at any moment leaves `latest` pointing at a complete
checkpoint.

Reading comes in two parts: `load_weights` (the model only, into a plain or meta-built model;
what evaluation and conversion need) and `restore_training_state` (optimizer, random generators
and trainer state too; what resuming a run needs).
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moectl.errors import MoectlError
from moectl.fsutil import disk_full, free_space, fsync_dir, fsync_tree
from moectl.rundir import CheckpointDir, ModelFolder

SAME_MODEL_HINT = "the recipe's model section must be the one the checkpoint was trained with"


# --------------------------------------------------------------------------- random generators


def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and numbers only (safe to read back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state: Any) -> None:
    """Raise ValueError unless `state` is what `rng_state` writes: a CPU generator state of this
    torch's size, a Python Mersenne Twister state, a NumPy MT19937 state."""
    if not isinstance(state, dict):
        raise ValueError("not a mapping")
    t = state.get("torch")
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == torch.get_rng_state().shape):
        raise ValueError("torch: not a generator state")
    py = state.get("python")
    if not (isinstance(py, (tuple, list)) and len(py) == 3 and isinstance(py[1], (tuple, list)) and len(py[1]) == 625
            and all(isinstance(x, int) and 0 <= x < 2**32 for x in py[1])):
        raise ValueError("python: not a Mersenne Twister state")
    n = state.get("numpy")
    if not (isinstance(n, dict) and n.get("kind") == "MT19937" and isinstance(n.get("keys"), torch.Tensor)
            and tuple(n["keys"].shape) == (624,) and bool(((n["keys"] >= 0) & (n["keys"] < 2**32)).all())
            and isinstance(n.get("pos"), int) and 0 <= n["pos"] <= 624 and n.get("has_gauss") in (0, 1)
            and isinstance(n.get("gauss"), float) and math.isfinite(n["gauss"])):
        raise ValueError("numpy: not an MT19937 state")
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)):
        raise ValueError("cuda: not generator states")


def set_rng_state(state: dict[str, Any]) -> None:
    check_rng_state(state)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_pt(path: Path) -> Any:
    """A checkpoint's .pt file: tensors, numbers and strings only; never executes code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MoectlError(f"{path} cannot be read safely: it holds something other than tensors, numbers and "
                          "strings (or is damaged), and moectl never runs code from a file",
                          hint="resume from another checkpoint of the run; do not load this file") from None
    except Exception as e:   # any parse failure of a damaged file (the unpickler raises many kinds)
        raise MoectlError(f"{path} cannot be read safely: it is damaged ({type(e).__name__})",
                          hint="resume from another checkpoint of the run") from None


# --------------------------------------------------------------------------- save


def save_checkpoint(ckpts: CheckpointDir, step: int, model, optimizer, trainer: dict[str, Any],
                    meta: dict[str, Any], *, rank: int, world_size: int, barrier, keep_last: int,
                    plan_state: dict[str, Any] | None = None, aliases: dict[str, str] | None = None,
                    globalize=None) -> Path:
    """Collective: every process calls it. Rank 0 writes model, optimizer and trainer state; every
    rank writes its RNG state; rank 0 then publishes the folder and moves `latest`. `aliases`
    (tied weights, see `tied_aliases` of the unwrapped model) are stored once, under their first name."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    for alias in aliases or {}:      # a sharded model gathers tied weights as separate copies
        model_state.pop(alias, None)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    if globalize is not None:   # expert shards -> the global tensors (collective)
        globalize(model_state, optim_state)
    final = ckpts.step_dir(step)
    tmp = ModelFolder(ckpts.temporary(step))
    if rank == 0:
        ckpts.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp.path, ignore_errors=True)
        tmp.rng_dir.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp.rng(rank))
    barrier()
    if rank == 0:
        try:
            save_file(_dedupe_shared(model_state), str(tmp.weights))
            torch.save(optim_state, tmp.optimizer)
            tmp.trainer.write_text(json.dumps(trainer, indent=2))
            if plan_state is not None:
                torch.save(plan_state, tmp.plan)
            delay = float(os.environ.get("MOECTL_CHECKPOINT_DELAY", "0"))  # fault-injection for tests
            if delay:
                time.sleep(delay)
            tmp.meta.write_text(json.dumps({**meta, "step": step, "world_size": world_size, "time": time.time()},
                                           indent=2))
            fsync_tree(tmp.path)
            if final.exists():  # a checkpoint of this step from an earlier attempt
                ckpts.release(final)
                shutil.rmtree(final)
            os.rename(tmp.path, final)
            fsync_dir(ckpts.root)
            ckpts.publish(final)
            ckpts.prune(keep_last)
        except BaseException as e:
            shutil.rmtree(tmp.path, ignore_errors=True)
            problem = _write_failure(e, ckpts.root, model_state, optim_state)
            if problem is not None:
                raise problem from None
            raise
    barrier()
    return final


def _write_failure(e: BaseException, root: Path, *states: Any) -> MoectlError | None:
    """A clear error for a checkpoint that could not be written (a full disk, a folder gone
    read-only); None for anything else. torch.save reports a full disk as a RuntimeError."""
    full = disk_full(e)
    denied = isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if not (full or denied):
        return None
    if denied:
        return MoectlError(f"cannot write a checkpoint into {root}: {e.strerror}",
                           hint="make the run folder writable, or train in another --run-dir")

    def size(x: Any) -> int:
        if hasattr(x, "numel") and hasattr(x, "element_size"):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return 0

    free = free_space(root)
    need = sum(size(st) for st in states) / 1e6
    return MoectlError(f"no space left on the device for a checkpoint in {root} (it needs about {need:,.1f} MB; "
                       f"{free}); the half-written checkpoint was removed and `latest` still names the last "
                       "complete one", hint="free some space (or lower train.keep_last), then continue with "
                                            "--resume auto")


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


# --------------------------------------------------------------------------- weights


def tied_aliases(model) -> dict[str, str]:
    """name -> the earlier name of the same parameter (tied weights; stored once in a checkpoint)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def read_weights(path: Path, device: Any = "cpu") -> dict[str, Any]:
    """The tensors of a checkpoint's model.safetensors, with a clear error for a missing or damaged file."""
    file = ModelFolder(path).weights
    if not file.is_file():
        raise MoectlError(f"{path} holds no {file.name}", hint="give a complete checkpoint (a step-* folder)")
    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise MoectlError(f"{file} is damaged or not a safetensors file ({e})",
                          hint="use another checkpoint of the run (checkpoints/step-*)") from None
    if str(device) == "cpu":
        return state
    return {k: v.to(device) for k, v in state.items()}


def check_weights(model, state: dict[str, Any], path: Path, aliases: dict[str, str] | None = None) -> None:
    """Refuse weights that do not fit the model, naming the tensors that are missing, unexpected
    or of another shape. Tied aliases may be absent; present, they are dropped from `state`."""
    aliases = tied_aliases(model) if aliases is None else aliases
    for alias in aliases:
        state.pop(alias, None)
    check_weight_specs(model, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, path, aliases)
    bad = [k for k, v in state.items() if not finite(v)]
    if bad:
        raise MoectlError(f"{path}: its weights hold NaN or infinite values ({_some(bad)})",
                          hint="the checkpoint is damaged: use another checkpoint of the run (checkpoints/step-*)")


def finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether a tensor holds no NaN or infinity (tensors that are not floating always do); checked
    in pieces of `chunk` values, so a large tensor needs no mask of its own size."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_weight_specs(model, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], path: Path,
                       aliases: dict[str, str] | None = None) -> None:
    """`check_weights` on what the tensors will be (shape, dtype by name), before any is read: a
    streaming conversion checks the files' headers first. Tied aliases are ignored."""
    aliases = tied_aliases(model) if aliases is None else aliases
    specs = {k: v for k, v in specs.items() if k not in aliases}
    reference = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items() if k not in aliases}
    missing = [k for k in expected if k not in specs]
    unexpected = [k for k in specs if k not in expected]
    shapes = [f"{k} {list(specs[k][0])} vs {list(expected[k])}" for k in expected
              if k in specs and tuple(specs[k][0]) != expected[k]]
    kinds = [f"{k} {str(specs[k][1]).removeprefix('torch.')} vs {str(reference[k].dtype).removeprefix('torch.')}"
             for k in expected if k in specs and not _same_kind(specs[k][1], reference[k].dtype)]
    if missing or unexpected or shapes or kinds:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes),
                             ("dtype differs", kinds)):
            if names:
                parts.append(f"{label}: {_some(names)}")
        raise MoectlError(f"{path} does not match the recipe's model ({'; '.join(parts)})", hint=SAME_MODEL_HINT)


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _same_kind(got: torch.dtype, want: torch.dtype) -> bool:
    """A floating tensor may be stored in any float dtype (it is cast on load); others exactly."""
    return got in FLOATS if want.is_floating_point else got == want


def _some(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_weights(path: Path, model, *, device: Any = "cpu", assign: bool = False,
                 dtypes: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's weights into a plain (unwrapped) model. With `assign=True` the file's
    tensors become the model's (for a model built on the meta device: nothing is initialised and
    then overwritten). `dtypes` casts floating tensors by name (default: the model's own dtypes).
    Touches no random generator, optimizer or trainer state."""
    state = read_weights(path, device)
    check_weights(model, state, path)
    for name, tensor in model.state_dict().items():
        want = (dtypes or {}).get(name, tensor.dtype)
        if name in state and state[name].dtype != want and want.is_floating_point:
            state[name] = state[name].to(want)
    model.load_state_dict(state, strict=False, assign=assign)
    model.tie_weights()


# --------------------------------------------------------------------------- training state

OPTIMIZER_HINT = "the file was changed or damaged: resume from another checkpoint of the run (checkpoints/step-*)"


def check_optimizer_state(state: Any, model, path: Path) -> None:
    """Refuse an optimizer.pt that is not AdamW state for `model`, before it reaches the optimizer:
    every moment tensor of a parameter's shape, floating and finite (second moments not negative),
    step counts finite and not negative, hyperparameters in range. (A fused AdamW step given
    smaller moments writes past their end and crashes the process.)"""

    def refuse(why: str) -> MoectlError:
        return MoectlError(f"{path} is not this model's optimizer state: {why}", hint=OPTIMIZER_HINT)

    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        raise refuse("it has no `state` and `param_groups`")
    params = dict(model.named_parameters())
    for name, entry in state["state"].items():
        if name not in params:
            raise refuse(f"it holds state for {name!r}, which the model does not have")
        if not isinstance(entry, dict):
            raise refuse(f"the state of {name} is not a mapping")
        for key, value in entry.items():
            where = f"{name} {key}"
            if key == "step":
                number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < 2**53:
                    raise refuse(f"{where} is not a step count ({_brief(value)})")
                continue
            if not isinstance(value, torch.Tensor):
                raise refuse(f"{where} is not a tensor ({_brief(value)})")
            if tuple(value.shape) != tuple(params[name].shape):
                raise refuse(f"{where} has shape {list(value.shape)}, the parameter {list(params[name].shape)}")
            if value.dtype not in FLOATS:
                raise refuse(f"{where} is {value.dtype}, not a floating tensor")
            if not bool(torch.isfinite(value).all()) or (key == "exp_avg_sq" and bool((value < 0).any())):
                raise refuse(f"{where} holds NaN, infinite{' or negative' if key == 'exp_avg_sq' else ''} values")
    for i, group in enumerate(state["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise refuse(f"param_groups[{i}] has no list of parameters")
        unknown = [p for p in group["params"] if not isinstance(p, str) or p not in params]
        if unknown:
            raise refuse(f"param_groups[{i}] names parameters the model does not have ({_brief(unknown[:3])})")
        for key, low, high in (("lr", 0, math.inf), ("eps", 0, math.inf), ("weight_decay", 0, math.inf)):
            value = group.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not low <= value < high):
                raise refuse(f"param_groups[{i}].{key} is {_brief(value)}")
        betas = group.get("betas")
        if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise refuse(f"param_groups[{i}].betas is {_brief(betas)}")


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."



def restore_training_state(path: Path, model, optimizer, *, rank: int, core,
                           aliases: dict[str, str] | None = None, localize=None) -> dict[str, Any]:
    """Resume training from a checkpoint: weights into the (possibly wrapped) model, the optimizer
    state, this process's random generators. Returns trainer.json, plus the routing plan's state
    under "plan" when the checkpoint has one. `core` is the unwrapped model, `aliases` its tied
    weights (taken before sharding, which may hide them)."""
    folder = ModelFolder(path)
    if not folder.complete():
        raise MoectlError(f"{path} is not a complete checkpoint (no {folder.meta.name} / {folder.weights.name})")
    aliases = tied_aliases(core) if aliases is None else aliases
    state = read_weights(path)
    if localize is not None:   # expert parallelism: this process's rows of the global expert tensors
        localize(model_state=state)
    check_weights(core, state, path, aliases)
    for alias, name in aliases.items():
        state[alias] = state[name]
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    optim_state = _load_pt(folder.optimizer)
    if localize is not None and isinstance(optim_state, dict):
        localize(optim_state=optim_state)
    check_optimizer_state(optim_state, core, folder.optimizer)
    try:
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as e:
        raise MoectlError(f"{folder.optimizer} does not fit the model's optimizer ({type(e).__name__}: {e})",
                          hint=SAME_MODEL_HINT) from None
    rng_file = folder.rng(rank)
    if not rng_file.is_file():
        rng_file = folder.rng(0)
    if rng_file.is_file():
        try:
            set_rng_state(_load_pt(rng_file))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise MoectlError(f"{rng_file} does not hold moectl's random generator states ({type(e).__name__}: {e})",
                              hint="resume from another checkpoint of the run") from None
    trainer = folder.read_trainer_state()
    if folder.plan.is_file():
        trainer["plan"] = _load_pt(folder.plan)
    return trainer
