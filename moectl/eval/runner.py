"""`moectl eval`: loss, perplexity and bits per byte of a trained run on held-out text, how it
routed those tokens, and how it fares when every router loses each token's top-1 expert.

The forward passes are the validation code training uses (`moectl.eval.validation.evaluate`);
the routing analysis watches them (`moectl.eval.routing.RoutingAnalysis`). `results.json` is
described in docs/eval.md (its format and version are `moectl.rundir`'s RESULTS_FORMAT and
RESULTS_VERSION).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moectl import __version__
from moectl.compare import plots
from moectl.core.moe import RouterContractError
from moectl.core.routers.base import RoutingMode
from moectl.data.loader import PackedSequences
from moectl.data.prepare import prepare_data
from moectl.data.sources import DataError, files_in
from moectl.errors import MoectlError
from moectl.eval.routing import RoutingAnalysis
from moectl.eval.validation import evaluate
from moectl.recipe.load import find_recipe, load_recipe
from moectl.recipe.schema import FilesSource, FileTokenizer, HFSource, StdlibSource
from moectl.rundir import (
    EVAL_PLOTS,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    RunDir,
    read_eval_results,
    results_file,
    write_eval_results,
)
from moectl.runs import Run

SPLITS = ("val", "train", "all")


@dataclass
class EvalData:
    seqs: PackedSequences
    description: str
    split: str
    tokens: int          # tokens of the split (the sequences use all but a remainder)


# --------------------------------------------------------------------------- data


def _source_of(spec: str):
    """A data source from `--data` when it is not a recipe: `stdlib`, `hf:NAME[:SPLIT]`, or local
    files (a file, a glob, or a folder of .txt/.jsonl/.json/.parquet files)."""
    if spec == "stdlib":
        return StdlibSource()
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return HFSource(name=name, split=split or "train")
    p = Path(spec)
    if p.is_dir():
        files = files_in(p)
        if not files:
            raise DataError(f"--data {spec}: the folder holds no .txt, .jsonl, .json or .parquet files")
        return FilesSource(paths=[glob.escape(str(f)) for f in files])
    if p.is_file() or glob.glob(spec, recursive=True):
        return FilesSource(paths=[spec])
    raise DataError(f"--data {spec}: no such recipe, file or folder",
                    hint="give a recipe (file, run folder or shipped name), a text/JSONL/Parquet file, a "
                         "glob, a folder, 'stdlib', or hf:NAME[:SPLIT]")


def _is_recipe(spec: str) -> bool:
    p = Path(spec)
    if spec.endswith((".yaml", ".yml")) or RunDir(p).config.is_file():
        return True
    return not p.exists() and spec != "stdlib" and not spec.startswith("hf:") and not glob.glob(spec, recursive=True)


def _data_config(run: Run, spec: str | None, overrides: list[str]):
    """(data section, default split) for `--data` and the data.* overrides."""
    if spec is not None and not spec.strip():
        raise DataError("--data is empty", hint="give a recipe, a file, a glob or a folder")
    stray = [o for o in overrides if "=" not in o]
    if stray:
        raise MoectlError(f"unexpected argument {stray[0]!r}: trailing arguments are data.key=value overrides",
                          hint="a glob given to --data must be quoted (--data 'notes/*.txt'), or the shell "
                               "expands it into several arguments")
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise MoectlError(f"{bad[0]}: only data.* settings can change at evaluation (the model is the run's)",
                          hint="e.g. data.max_documents=200 or data.val_fraction=0.05")
    base: Path | str = run.home.config
    if spec is not None and _is_recipe(spec):
        try:
            base = find_recipe(spec)
        except MoectlError as e:
            raise DataError(f"--data {spec}: no such recipe, file or folder", hint=e.hint) from None
        other = load_recipe(base, overrides)
        data = other.data
        if data.split_seed is None:   # that recipe's validation split, whatever the run's seed
            data = data.model_copy(update={"split_seed": other.seed})
        return data, "val"
    data = load_recipe(base, overrides).data
    if spec is None:
        return data, "val"
    return data.model_copy(update={"source": _source_of(spec), "max_documents": data.max_documents}), "all"


def _data_recipe(run: Run, spec: str | None, overrides: list[str]):
    """The run's recipe with the data section `--data` and the overrides name, tokenised with the
    run's own tokenizer (so token ids mean what the model learned). Returns (recipe, default split)."""
    if run.tokenizer is None:
        raise MoectlError(f"{run.checkpoint} holds no tokenizer.json, so no text can be tokenised for it",
                          hint="evaluate a run folder written by `moectl train`")
    data, split = _data_config(run, spec, overrides)
    eot = run.tokenizer.inner.id_to_token(run.tokenizer.eot_id)
    tokenizer = FileTokenizer(path=str(run.tokenizer.path), eot_token=eot,
                              add_special_tokens=run.tokenizer.add_special_tokens)
    return run.recipe.model_copy(update={"data": data.model_copy(update={"tokenizer": tokenizer})}), split


def eval_data(run: Run, spec: str | None, split: str | None, overrides: list[str], show_progress: bool,
              log=print) -> EvalData:
    """The tokens to evaluate on: the run's validation split by default, or what `--data` names
    (a recipe: its validation split; a source: all of it), packed into seq_len + 1 windows."""
    recipe, default_split = _data_recipe(run, spec, overrides)
    split = split or default_split
    if split not in SPLITS:
        raise MoectlError(f"--split {split}: unknown split", hint=f"use one of {', '.join(SPLITS)}")
    prepared = prepare_data(recipe, show_progress=show_progress, log=log, for_training=False)
    parts = ("train", "val") if split == "all" else (split,)
    tokens = np.concatenate([np.asarray(prepared.tokens(s)) for s in parts])
    seq_len = run.recipe.model.seq_len
    seqs = PackedSequences(tokens, seq_len)
    what = spec or f"the run's data ({recipe.data.source.kind})"
    if len(seqs) == 0:
        raise DataError(f"{what}, split {split}: {len(tokens)} tokens, fewer than one sequence of "
                        f"model.seq_len + 1 = {seq_len + 1}", hint="evaluate on more text (or another split)")
    return EvalData(seqs, what, split, int(len(tokens)))


# --------------------------------------------------------------------------- the passes


def autocast_for(device: torch.device, dtype: str) -> tuple[Callable[[], Any], str]:
    """(autocast context factory, dtype name): bf16 where the device supports it under 'auto'."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext, dtype
    if dtype != "bfloat16":
        raise MoectlError(f"--dtype {dtype}: unknown", hint="use auto, float32 or bfloat16")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), dtype


def robustness_refusal(model) -> str | None:
    """Why the drop-top-1 perturbation is not defined for this model, or None."""
    layers = model.routed_layers()
    if not layers:
        return "a dense model has no router to perturb"
    for layer in layers:
        router = layer.router
        if router.num_experts < 2:
            return f"router {router.kind!r} has a single expert: there is no other expert to route to"
        if router.drop_top1_refusal is not None:
            return f"router {router.kind!r}: {router.drop_top1_refusal}"
        if router.fixed_k and router.top_k >= router.num_experts:
            return (f"router {router.kind!r} routes every token to all {router.num_experts} experts (top_k = "
                    "num_experts): nothing is left to choose from once the top-1 expert is dropped")
    return None


def _scores(loss: float, tokens: int, nbytes: int) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.inf if loss >= 700 else math.exp(loss),
            "bits_per_byte": loss * tokens / (math.log(2) * nbytes) if nbytes else math.nan}


def evaluate_run(run: Run, data: EvalData, *, batch_size: int, max_batches: int | None, device: torch.device,
                 autocast: Callable[[], Any], robustness: bool, progress: Callable[[str, int], Any]) -> dict[str, Any]:
    """Every pass of `moectl eval`: plain (with the routing analysis), then perturbed."""
    n = len(data.seqs)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)][:max_batches]
    tokens = sum(len(b) for b in batches) * data.seqs.seq_len
    lengths = torch.tensor(run.tokenizer.byte_lengths() + [0] * max(0, run.model.args.vocab_size
                                                                     - run.tokenizer.vocab_size))
    nbytes = int(sum(int(lengths[data.seqs.batch(b)[1]].sum()) for b in batches))
    analysis = RoutingAnalysis(run.model.args.vocab_size)
    loss, _ = evaluate(run.model, data.seqs, batches, device, autocast, mode=RoutingMode(observer=analysis),
                       on_batch=progress("evaluating", len(batches)))
    out: dict[str, Any] = {**_scores(loss, tokens, nbytes), "tokens_evaluated": tokens, "bytes": nbytes,
                           "sequences": sum(len(b) for b in batches)}
    out["routing"] = analysis.result(run.tokenizer) if analysis.layers else None
    out["robustness"] = None
    if robustness:
        reason = robustness_refusal(run.model)
        out["robustness"] = {"defined": reason is None, "reason": reason}
        if reason is None:
            try:
                loss_p, _ = evaluate(run.model, data.seqs, batches, device, autocast, mode=RoutingMode(drop_top1=True),
                                     on_batch=progress("perturbed (top-1 expert dropped)", len(batches)))
            except RouterContractError as e:
                raise MoectlError(str(e), hint="a router that honours RoutingMode.drop_top1 must leave out the "
                                  "mask Router.top1_excluded gives (docs/eval.md); --no-robustness skips the "
                                  "pass") from None
            out["robustness"].update(_scores(loss_p, tokens, nbytes))
    return out


def results_record(run: Run, data: EvalData, device: torch.device, dtype: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "moectl": __version__,
            "run": str(run.run_dir or run.checkpoint), "checkpoint": str(run.checkpoint), "step": run.step,
            "recipe": run.recipe.name, "device": str(device), "dtype": dtype,
            "data": {"description": data.description, "split": data.split, "tokens": data.tokens,
                     "seq_len": data.seqs.seq_len},
            **body}


def foreign_files(target: Path) -> list[str]:
    """What in an --out folder moectl eval did not write: [] for a new or empty folder, or one that
    holds a moectl results.json (an earlier report, whose files eval replaces). Otherwise the
    folder's entries, which eval must not touch."""
    target = Path(target)
    if not target.is_dir():
        return [] if not target.exists() else [target.name]
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return []
    try:
        read_eval_results(results_file(target))
        return []
    except MoectlError:
        return entries


def write_results(results: dict[str, Any], target: Path, run_dir: Path | None, *, plots: bool,
                  log=print) -> list[Path]:
    """results.json and (with matplotlib) the PNG plots into `target`; returns what was written."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = [write_eval_results(target, results)]
    except OSError as e:
        raise MoectlError(f"cannot write {results_file(target)} ({e.strerror or e})",
                          hint="free some space or choose another place with --out") from None
    if plots:
        written += _plots(results, target, run_dir, log)
    else:
        for stale in EVAL_PLOTS.values():
            (target / stale).unlink(missing_ok=True)
    return written


def _plots(results: dict[str, Any], target: Path, run_dir: Path | None, log) -> list[Path]:
    if not plots.plots_available():
        log(f"no plots: matplotlib is not installed ({plots.PLOT_HINT}); results.json and the tables are complete")
        return []
    jobs: list[tuple[str, Callable[[Path], Any]]] = []
    routing = results.get("routing")
    if routing:
        jobs.append((EVAL_PLOTS["expert_load"], lambda p: plots.expert_load_heatmap(results, p)))
        jobs.append((EVAL_PLOTS["router_entropy"], lambda p: plots.entropy_histograms(results, p)))
        if routing.get("mutual_information") and len(routing["layer_order"]) > 1:
            jobs.append((EVAL_PLOTS["mutual_information"], lambda p: plots.mutual_information_heatmap(results, p)))
    if run_dir is not None and RunDir(run_dir).metrics.is_file():
        jobs.append((EVAL_PLOTS["curves"], lambda p: plots.training_curves([(results["recipe"], run_dir)], p)))
    for stale in set(EVAL_PLOTS.values()) - {name for name, _ in jobs}:   # an earlier report's, not redrawn
        (target / stale).unlink(missing_ok=True)
    written = []
    for name, job in jobs:
        try:
            job(target / name)
            written.append(target / name)
        except OSError as e:
            raise MoectlError(f"cannot write {target / name} ({e.strerror or e})") from None
    return written
