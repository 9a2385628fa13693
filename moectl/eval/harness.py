"""Downstream tasks through lm-evaluation-harness, on a native moectl model.

`MoectlLM` is an lm-eval language model (`lm_eval.api.model.LM`) over a loaded run
(`moectl.runs.load_run`), so every router, block kind and routed-layer variant moectl can train is
evaluated as it is, with no export to another format. `run_tasks` runs lm-eval tasks (its own
registry, or task definitions in local folders) with it and returns their metrics as plain JSON.

How requests become forwards:

* loglikelihood(context, continuation): the two are encoded separately and concatenated (trailing
  whitespace of the context moves to the start of the continuation, as lm-eval's own models do);
  an empty context conditions on the end-of-text token. Each continuation token is scored with as
  much context as the model was trained on (`model.args.seq_len`): the usual case is one forward
  over the last seq_len + 1 tokens; a continuation longer than seq_len is scored in disjoint
  chunks of seq_len tokens, each with a full window of context.
* loglikelihood_rolling(text): the text's tokens after an end-of-text token, in disjoint windows
  of seq_len predictions (the last window keeps a full context), every token scored once.
* generate_until(context, kwargs): greedy decoding with the KV cache
  (`moectl.core.generation.generate_ids`), stopping at end-of-text, at an `until` string (cut from
  the answer) or after `max_gen_toks` tokens (default 256). The context is left-truncated to leave
  room for them in the seq_len positions, keeping at least half of them (a small window then
  generates fewer tokens). Sampling settings of a task are ignored.

Windows of many requests share a forward, longest first, padded on the right. Attention is causal,
so padding changes nothing for a router that decides each token alone. Two kinds of routing are
not like that: a capacity limit (`model.moe.capacity_factor`) drops slots according to every
token of the forward, padding included, and a non-causal router (expert_choice) lets experts pick
among all tokens of the forward. Every scoring forward is therefore run in decoding mode
(`RoutingMode(decoding=True)`, the routing of KV-cache decoding): batch-dependent routing steps, the
capacity limit among them, are skipped, so a token is routed the same however many tokens share
its forward, as in generation. A model whose forward has no such switch and has a capacity
limit, and any model with a non-causal router, is evaluated one window per forward, unpadded, so
a score never depends on the other requests of its batch. (A non-causal router still routes a
context token according to the continuation that follows it, so its scores are optimistic, as
its validation loss is; it cannot generate at all.)
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moectl.core.generation import (
    GenerationError,
    check_generatable,
    generate_ids,
    non_causal_routers,
)
from moectl.core.routers.base import RoutingMode
from moectl.errors import MoectlError, RuntimeFailure
from moectl.extras import install_hint

try:  # lm-eval is an extra (moectl's eval extra); without it this module still imports
    from lm_eval.api.model import LM
except ImportError:  # pragma: no cover - exercised only where lm-eval is missing
    LM = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from moectl.runs import Run

INSTALL_HINT = install_hint("eval")
DEFAULT_MAX_GEN_TOKS = 256


def require_lm_eval():
    """The lm_eval module, or a MoectlError (exit 2) saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError as e:
        raise MoectlError(f"downstream tasks need lm-evaluation-harness, which cannot be imported ({e})",
                          hint=INSTALL_HINT) from None
    return lm_eval


# --------------------------------------------------------------------------- scoring windows


@dataclass(frozen=True)
class Window:
    """One forward's worth of a request: the input ids, and the ids its last len(targets)
    positions should predict."""

    request: int
    inputs: list[int]
    targets: list[int]


def score_windows(tokens: list[int], start: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs that score every token of tokens[start:] exactly once, in disjoint
    chunks of at most seq_len targets, each given as much preceding context as fits in seq_len
    inputs. `start` >= 1: the first token is only ever context."""
    assert start >= 1 and seq_len >= 1
    out = []
    for first in range(start, len(tokens), seq_len):
        end = min(first + seq_len, len(tokens))
        begin = max(0, end - 1 - seq_len)
        out.append((tokens[begin:end - 1], tokens[first:end]))
    return out


def forward_mode(model: torch.nn.Module) -> tuple[dict[str, Any], str | None]:
    """(keyword arguments of every scoring forward, why requests may not share a padded forward or
    None when they may). See the module docstring."""
    layers = model.routed_layers() if hasattr(model, "routed_layers") else []
    capped = any(getattr(layer, "capacity_factor", None) is not None for layer in layers)
    decodes = "mode" in inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"mode": RoutingMode(decoding=True)} if decodes else {}
    noncausal = non_causal_routers(model) if layers else []
    if noncausal:
        return kwargs, (f"router {', '.join(noncausal)} is not causal: each request is evaluated in a "
                        "forward of its own")
    if capped and not decodes:
        return kwargs, ("the capacity limit depends on every token of a forward and this model's forward "
                        "cannot skip it: each request is evaluated in a forward of its own")
    return kwargs, None


def _progress(enabled: bool, total: int, what: str):
    bar = Progress(TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not enabled, transient=True)
    return bar, bar.add_task(what, total=total)


# --------------------------------------------------------------------------- the adapter


class MoectlLM(LM):
    """An lm-eval language model over a loaded moectl run (see the module docstring)."""

    def __init__(self, run: Run, *, batch_size: int = 8, log: Callable[[str], Any] | None = print):
        require_lm_eval()
        super().__init__()
        if run.tokenizer is None:
            raise MoectlError(f"{run.checkpoint} has no tokenizer (tokenizer.json), and downstream tasks are text",
                              hint="evaluate a run folder written by `moectl train`, which saves its tokenizer")
        if batch_size < 1:
            raise MoectlError(f"the batch size must be at least 1 (got {batch_size})")
        self.run, self.model, self.tokenizer = run, run.model, run.tokenizer
        self.seq_len = int(self.model.args.seq_len)
        self.batch_size = batch_size
        self.log = log
        self._device = next(self.model.parameters()).device
        self.forward_kwargs, self.unbatched_reason = forward_mode(self.model)

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; an empty context is the end-of-text token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        before, _ = self.tokenizer.template()
        ctx = before + (self.tokenizer.encode(context) if context else [])
        return ctx or [self.eot_id], self.tokenizer.encode(continuation)

    # ----------------------------------------------------------------- lm-eval's interface

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows = []
        for i, req in enumerate(requests):
            ctx, cont = self.encode_pair(*req.args)
            windows += [Window(i, x, y) for x, y in score_windows(ctx + cont, len(ctx), self.seq_len)]
        results = self._sum(self.score(windows, "loglikelihood", disable_tqdm), len(requests))
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = []
        for i, req in enumerate(requests):
            start = self.tokenizer.template()[0] or [self.eot_id]   # what a text begins with; not scored
            tokens = [*start, *self.tokenizer.encode(req.args[0])]
            windows += [Window(i, x, y) for x, y in score_windows(tokens, len(start), self.seq_len)]
        results = [lp for lp, _ in self._sum(self.score(windows, "perplexity", disable_tqdm), len(requests))]
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        bar, task = _progress(self.log is not None and not disable_tqdm, len(requests), "generate")
        try:
            check_generatable(self.model)
            with bar:
                for req in requests:
                    context, kwargs = req.args
                    out.append(self.generate_one(context, dict(kwargs or {})))
                    self.cache_hook.add_partial("generate_until", req.args, out[-1])
                    bar.advance(task)
        except GenerationError as e:
            raise MoectlError(e.message, hint=e.hint) from None
        return out

    # ----------------------------------------------------------------- the work

    def generate_one(self, context: str, kwargs: dict[str, Any]) -> str:
        """Greedy continuation of `context`, cut at the first `until` string."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or DEFAULT_MAX_GEN_TOKS)
        prompt = self.tokenizer.template()[0] + (self.tokenizer.encode(context) if context else [])
        prompt = prompt or [self.eot_id]
        decode = self.tokenizer.decode
        stop = (lambda ids: any(u in decode(ids) for u in until)) if until else None
        new = generate_ids(self.model, prompt[-self.prompt_room(max_new):], max_new, temperature=0.0,
                           stop_ids={self.eot_id}, stop=stop)
        if self.eot_id in new:
            new = new[:new.index(self.eot_id)]
        text = decode(new)
        cut = min((text.index(u) for u in until if u in text), default=len(text))
        return text[:cut]

    def prompt_room(self, max_new: int) -> int:
        """How many of the context's last tokens a generation keeps: room for `max_new` new ones in
        the model's seq_len positions, but never less than half of them (a tiny window then
        generates fewer than `max_new` tokens rather than continue a context it cannot see)."""
        return max(1, min(self.seq_len - 1, max(self.seq_len - max_new, (self.seq_len + 1) // 2)))

    @staticmethod
    def _sum(scored: list[tuple[int, float, bool]], n: int) -> list[tuple[float, bool]]:
        """Per request: the sum over its windows, and whether all of them were greedy (a request
        with nothing to score, an empty continuation, is (0.0, True))."""
        totals, greedy = [0.0] * n, [True] * n
        for request, logprob, is_greedy in scored:
            totals[request] += logprob
            greedy[request] = greedy[request] and is_greedy
        return list(zip(totals, greedy, strict=True))

    @torch.no_grad()
    def score(self, windows: list[Window], what: str, disable_tqdm: bool = False) -> list[tuple[int, float, bool]]:
        """(request, sum of the targets' log-probabilities, whether each target is the argmax) per
        window, in the order given. Windows run longest first, `batch_size` to a forward, with the
        model in eval mode (it is left as it was)."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
        size = 1 if self.unbatched_reason else self.batch_size
        out: list[Any] = [None] * len(windows)
        bar, task = _progress(self.log is not None and not disable_tqdm, len(windows), what)
        was_training = self.model.training
        self.model.eval()
        try:
            with bar:
                for lo in range(0, len(order), size):
                    chunk = [windows[i] for i in order[lo:lo + size]]
                    for i, res in zip(order[lo:lo + size], self._score_batch(chunk), strict=True):
                        out[i] = res
                    bar.advance(task, len(chunk))
        finally:
            self.model.train(was_training)
        return out

    def _score_batch(self, chunk: list[Window]) -> Iterator[tuple[int, float, bool]]:
        width = max(len(w.inputs) for w in chunk)
        x = torch.full((len(chunk), width), self.eot_id, dtype=torch.long)
        for row, w in enumerate(chunk):
            x[row, :len(w.inputs)] = torch.tensor(w.inputs, dtype=torch.long)
        logits = self.model(x.to(self._device), **self.forward_kwargs).logits
        for row, w in enumerate(chunk):
            end, k = len(w.inputs), len(w.targets)
            logp = logits[row, end - k:end].float().log_softmax(-1)
            target = torch.tensor(w.targets, dtype=torch.long, device=logp.device)
            total = logp.gather(-1, target[:, None]).double().sum().item()
            yield w.request, total, bool((logp.argmax(-1) == target).all())


# --------------------------------------------------------------------------- tasks


@lru_cache(maxsize=1)
def _builtin_manager():
    """lm-eval's own task registry (scanning it takes seconds; it does not change in a process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_tasks(names: list[str], include_path: Path | None):
    """(lm-eval TaskManager, task names with glob patterns expanded), or a MoectlError naming the
    unknown tasks with their closest known names. Plain tasks all defined under `include_path` are
    loaded from there alone (lm-eval's own registry takes seconds to scan); anything else (a
    built-in task, a group, a tag, a pattern) from lm-eval's registry with `include_path` on top."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_defaults=False, include_path=str(include_path))
        if all(name in local.all_subtasks for name in names):
            return local, names
        manager = TaskManager(include_path=str(include_path))
    else:
        manager = _builtin_manager()
    known = set(manager.all_tasks)
    expanded, unknown = [], []
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            expanded.append(name)
        elif any(c in name for c in "*?[") and manager.match_tasks([name]):
            expanded += [n for n in manager.match_tasks([name]) if n not in expanded]
        else:
            unknown.append(name)
    if unknown:
        raise _unknown_tasks(unknown, manager.all_tasks, include_path)
    return manager, expanded


def _unknown_tasks(unknown: list[str], known: Sequence[str], include_path: Path | None) -> MoectlError:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval's registry or {include_path}" if include_path else "lm-eval's registry"
    s = "s" if len(unknown) > 1 else ""
    return MoectlError(f"unknown task{s} {'; '.join(parts)}: not in {where}",
                       hint="`lm-eval ls tasks` lists the tasks lm-eval knows; a task of your own is a YAML "
                            "file in a folder given as the include path (docs/downstream.md)")


def _task_names(tasks: Sequence[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = []
    for t in tasks:
        names += [n.strip() for n in str(t).split(",") if n.strip() and n.strip() not in names]
    if not names:
        raise MoectlError("no tasks given", hint="name lm-eval tasks, e.g. --tasks hellaswag,arc_easy")
    return names


def _include_path(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MoectlError(f"include path {path} " + ("is a file, not a folder" if p.exists() else "does not exist"),
                          hint="give a folder of lm-eval task YAML files (searched recursively); one task file "
                               "can also be named by its path among the tasks")
    return p.resolve()


# --------------------------------------------------------------------------- running them


def run_tasks(run: Run, tasks: Sequence[str] | str, *, limit: int | None = None, batch_size: int = 8,
              include_path: str | Path | None = None, num_fewshot: int | None = None,
              log: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Run lm-eval tasks on a loaded run; returns their metrics and the settings, as plain JSON:

        {"results":   {task: {metric: value, "<metric>_stderr": value, ...}, ...},
         "versions":  {task: version}, "n_shot": {task: n},
         "n_samples": {task: {"original": docs in the split, "effective": docs evaluated}},
         "higher_is_better": {task: {metric: bool}},
         "settings":  {"tasks", "limit", "num_fewshot", "batch_size", "include_path", "seq_len",
                       "separate_forwards", "generation", "lm_eval"}}

    A metric of a filter other than lm-eval's default ("none") keeps lm-eval's "metric,filter"
    name; a value lm-eval could not compute (a stderr of one document) is null. `limit` evaluates
    the first N documents of each task; `num_fewshot` overrides the tasks' own number of examples;
    `include_path` is a folder of task YAML definitions (searched recursively). `log` gets a few
    progress lines (None: silent, lm-eval's logging included). Bad input (lm-eval missing, an
    unknown task, a run without tokenizer) is a MoectlError with exit code 2, raised before
    anything is written; a dataset that cannot be downloaded is a RuntimeFailure (exit code 1)."""
    lm_eval = require_lm_eval()
    names = _task_names(tasks)
    for what, value, low in (("limit", limit, 1), ("num_fewshot", num_fewshot, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise MoectlError(f"{what} must be a whole number of at least {low} (got {value!r})")
    include = _include_path(include_path)
    adapter = MoectlLM(run, batch_size=batch_size, log=log)
    manager, names = resolve_tasks(names, include)
    version = _lm_eval_version(lm_eval)
    if log is not None:
        log(f"lm-eval {version}: {', '.join(names)}" + (f" (first {limit} documents each)" if limit else ""))
        if adapter.unbatched_reason:
            log(f"note: {adapter.unbatched_reason}")
        moe = getattr(run.model.args, "moe", None)
        if moe is not None and moe.capacity_factor is not None and "mode" in adapter.forward_kwargs:
            log(f"note: the capacity limit (model.moe.capacity_factor = {moe.capacity_factor}) is off while "
                "scoring, as in generation: it would make a request's routing depend on its batch")
    with _lean(log is None), _own_random_state():
        try:
            out = lm_eval.simple_evaluate(model=adapter, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          batch_size=batch_size, task_manager=manager, log_samples=False)
        except OSError as e:
            raise _data_error(e) from None
    settings = {"tasks": names, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "include_path": str(include) if include else None, "seq_len": adapter.seq_len,
                "separate_forwards": adapter.unbatched_reason, "generation": "greedy", "lm_eval": version}
    result = summarise(out, settings)
    if log is not None:
        for task, metrics in result["results"].items():
            log(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                        if isinstance(v, float) and not k.endswith("_stderr")))
    return result


def summarise(out: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """run_tasks' answer from simple_evaluate's."""
    results = {}
    for task, values in out.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if key in ("alias", "name", "sample_len") or not isinstance(key, str):   # not metrics
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = value
        results[task] = metrics
    return _jsonable({"results": results, "versions": out.get("versions", {}), "n_shot": out.get("n-shot", {}),
                      "n_samples": out.get("n-samples", {}), "higher_is_better": out.get("higher_is_better", {}),
                      "settings": settings})


def _jsonable(value: Any) -> Any:
    """Plain JSON: dicts, lists, str, bool, int, finite floats and None (numpy scalars become
    Python numbers; NaN, infinities and lm-eval's "N/A" become None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value == "N/A":
        return None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    return str(value)


def _data_error(e: OSError) -> MoectlError:
    hub_missing = any(c.__name__ == "DatasetNotFoundError" for c in type(e).__mro__)   # a Hub dataset
    if isinstance(e, FileNotFoundError) and not hub_missing:
        return MoectlError(f"a task's data could not be found: {e}",
                           hint="check the data_files of a local task definition (paths are relative to the "
                                "folder you run from)")
    return RuntimeFailure(f"lm-eval could not load a task's data: {e}",
                          hint="lm-eval downloads a built-in task's dataset from the Hugging Face Hub on first "
                               "use: check the network (and that HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are not "
                               "set unless the data is cached)")


def _lm_eval_version(lm_eval) -> str:
    try:
        return version("lm_eval")
    except Exception:
        return str(getattr(lm_eval, "__version__", "unknown"))


@contextmanager
def _swapped(module: Any, name: str, value: Any):
    """`module.name` is `value` inside the block (nothing happens where the module has no such name)."""
    if not hasattr(module, name):
        yield
        return
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _no_env_info(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _lean(quiet: bool):
    """simple_evaluate without what run_tasks does not report: the environment survey and git
    hash it adds to its answer (seconds of subprocesses: pip, git, nvidia-smi, whose complaints
    reach the terminal). With `quiet`, also without lm-eval's and datasets' logging and progress
    bars (lm-eval's per-document bar has no switch: its module is lent a silent one)."""
    import lm_eval.api.task
    import lm_eval.evaluator

    with ExitStack() as stack:
        stack.enter_context(_swapped(lm_eval.evaluator, "add_env_info", _no_env_info))
        stack.enter_context(_swapped(lm_eval.evaluator, "get_git_commit_hash", _no_env_info))
        if quiet:
            task_tqdm = getattr(lm_eval.api.task, "tqdm", None)
            if task_tqdm is not None:
                stack.enter_context(_swapped(lm_eval.api.task, "tqdm", partial(task_tqdm, disable=True)))
            for name in ("lm_eval", "datasets", "huggingface_hub"):
                logger = logging.getLogger(name)
                stack.callback(logger.setLevel, logger.level)
                logger.setLevel(logging.ERROR)
            try:
                import datasets

                if datasets.is_progress_bar_enabled():
                    datasets.disable_progress_bars()
                    stack.callback(datasets.enable_progress_bars)
            except (ImportError, AttributeError):
                pass
        yield


@contextmanager
def _own_random_state():
    """simple_evaluate seeds Python's, numpy's and torch's generators: put them back afterwards,
    so evaluating touches no random generator of the caller."""
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized()
                                   else []):
            yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
