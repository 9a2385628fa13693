"""`moectl eval`: judge a trained run on held-out text and show how it routes."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moectl.cli.common import (
    OVERRIDES_HELP,
    handle_errors,
    pick_device,
    plain_log,
    single_process,
    stderr_console,
    stdout_console,
)

RUN_HELP = "A run folder written by `moectl train`, one of its checkpoints/step-* folders, or checkpoints/latest."


@handle_errors
def eval_run(
    run: str = typer.Argument(..., help=RUN_HELP, metavar="RUN_OR_CHECKPOINT"),
    overrides: list[str] = typer.Argument(None, help="Trailing data.key=value overrides of the evaluation data "
                                          "(e.g. data.max_documents=200). " + OVERRIDES_HELP,
                                          show_default=False, metavar="KEY=VALUE..."),
    data: str = typer.Option(None, "--data", help="Evaluate on other text: a recipe (file, run folder or shipped "
                             "name; its validation split), a file, glob or folder of .txt/.jsonl/.json/.parquet "
                             "files, 'stdlib', or hf:NAME[:SPLIT] (all of it). Default: the run's validation split. "
                             "Always tokenised with the run's tokenizer."),
    split: str = typer.Option(None, "--split", help="Which split of the data: val, train or all "
                              "(default: val for the run or a recipe, all for a source)."),
    step: int = typer.Option(None, "--step", min=0, help="Evaluate this step's checkpoint (default: the latest)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Sequences per forward (default: the "
                                   "recipe's train.batch_size; 8 requests for --tasks)."),
    batches: int = typer.Option(None, "--batches", min=1, help="Evaluate at most this many batches "
                                "(default: every sequence of the split)."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 autocast where the device supports it, else "
                              "fp32), float32 or bfloat16. Router math stays fp32."),
    robustness: bool = typer.Option(True, "--robustness/--no-robustness", help="Also evaluate with every "
                                    "router's top-1 expert dropped (CartesianMoE's robustness protocol; a second "
                                    "pass)."),
    tasks: str = typer.Option(None, "--tasks", help="Comma-separated lm-evaluation-harness tasks "
                              "(e.g. hellaswag,arc_easy); needs moectl's eval extra (lm-eval)."),
    limit: int = typer.Option(None, "--limit", min=1, help="At most this many documents per task (with --tasks)."),
    task_path: Path = typer.Option(None, "--task-path", help="A folder of local lm-eval task definitions (YAML)."),
    out: Path = typer.Option(None, "--out", help="Where results.json and the plots go (default: <run>/eval)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots (needs moectl's plot "
                               "extra: matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json to stdout instead of the tables."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
) -> None:
    """Loss, perplexity and bits per byte of a trained run, its routing analysis, routing robustness and
    (optionally) downstream tasks; writes <run>/eval/results.json and PNG plots. See docs/eval.md.

    Exit codes: 0 done, 2 bad input (not a run, no checkpoint, unknown task, too little data, ...)."""
    from moectl.eval import runner
    from moectl.fsutil import json_text
    from moectl.runs import load_run

    single_process("eval")
    dev = pick_device(device)
    autocast, dtype_name = runner.autocast_for(dev, dtype)
    loaded = load_run(run, step=step, device=dev)
    target = out if out is not None else loaded.home.eval_dir
    _check_writable(target)
    err = stderr_console()
    log = (lambda msg: None) if quiet or as_json else plain_log(err)
    task_list = _task_names(tasks, limit, task_path)
    data_ = runner.eval_data(loaded, data, split, overrides or [], show_progress=not (quiet or as_json), log=log)
    task_results = None
    if task_list:
        from moectl.eval.harness import run_tasks

        task_results = run_tasks(loaded, task_list, limit=limit, include_path=task_path,
                                 batch_size=batch_size or 8, log=None if quiet or as_json else log)
    from moectl.progress import JobProgress

    with JobProgress(not (quiet or as_json), console=stderr_console()) as progress:
        body = runner.evaluate_run(loaded, data_, batch_size=batch_size or loaded.recipe.train.batch_size,
                                   max_batches=batches, device=dev, autocast=autocast, robustness=robustness,
                                   progress=lambda label, total: progress.task(label, total, unit="batches"))
    body["tasks"] = task_results
    results = runner.results_record(loaded, data_, dev, dtype_name, body)
    written = runner.write_results(results, target, loaded.run_dir, plots=plots, log=log)
    if as_json:
        print(json_text(results), end="")
    elif not quiet:
        from moectl.eval.report import print_results

        print_results(results, stdout_console(), written)
    sys.stdout.flush()


def _task_names(tasks: str | None, limit: int | None, task_path: Path | None) -> list[str]:
    from moectl.errors import MoectlError

    if tasks is None:
        if limit is not None or task_path is not None:
            raise MoectlError(f"{'--limit' if limit is not None else '--task-path'} applies to downstream tasks, "
                              "and no --tasks were given", hint="add --tasks NAME[,NAME...]")
        return []
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise MoectlError("--tasks is empty", hint="give comma-separated task names, e.g. --tasks hellaswag,arc_easy")
    return names


def _check_writable(target: Path) -> None:
    """Fail before any work when results could not be written."""
    import os

    from moectl.errors import MoectlError

    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise MoectlError(f"cannot write the results to {target} ({probe} is not a writable folder)",
                          hint="choose another place with --out")
    from moectl.eval.runner import foreign_files

    foreign = foreign_files(target)
    if foreign:
        raise MoectlError(f"{target} holds files moectl eval did not write ({', '.join(foreign[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}), which its report could replace",
                          hint="give --out a new or empty folder, or a folder an earlier `moectl eval` wrote")
