"""`moectl train`: train a recipe on CPU, one GPU, or several processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from moectl.cli.common import OVERRIDES_HELP, RECIPE_HELP, handle_errors, stdout_console


@handle_errors
def train(
    recipe: str = typer.Argument(..., help=RECIPE_HELP, metavar="RECIPE"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
    resume: str = typer.Option("auto", "--resume", help="'auto': continue from the run's latest checkpoint "
                               "if there is one; 'never': start fresh (refuses a run folder with checkpoints); "
                               "or a checkpoint / run folder to start from."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run folder (default: train.run_dir; else RECIPE itself when "
                                 "it is a folder; else runs/<name>)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine "
                              "(gloo on CPU, NCCL on GPUs). torchrun and `accelerate launch --multi_gpu` work "
                              "too (see docs/training.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines; errors only."),
) -> None:
    """Train a recipe's model: data preparation, training, validation and checkpoints in one run folder.

    Exit codes: 0 done (also when the run had finished already: nothing is rewritten), 1 runtime failure (e.g. a
    non-finite loss) or interrupted before any checkpoint was saved, 2 bad recipe, data or run folder, 130
    interrupted with a checkpoint to continue from (--resume auto). Ctrl-C, SIGTERM, a closed terminal (SIGHUP)
    and output nobody reads any more (`| head`) all stop the run at the end of a step, with a checkpoint."""
    from moectl.recipe.load import load_recipe
    from moectl.train.launch import is_worker, launch

    rec = load_recipe(recipe, overrides or [])
    if run_dir is None and rec.train.run_dir is None and Path(recipe).is_dir():
        run_dir = Path(recipe)   # a run folder (or a `moectl convert` folder) trains in place
    if nproc > 1 and not is_worker():
        argv = ["train", recipe, *(overrides or []), "--resume", resume]
        if run_dir is not None:
            argv += ["--run-dir", str(run_dir)]
        if quiet:
            argv.append("--quiet")
        raise typer.Exit(launch(nproc, argv))
    from moectl.train.trainer import request_stop
    from moectl.train.trainer import train as run_training

    quiet = quiet or os.environ.get("MOECTL_QUIET") == "1"
    # Output nobody reads any more (`| head`, a closed terminal) stops the run as Ctrl-C does.
    console = stdout_console(on_closed=lambda: request_stop("the output was closed"))
    if quiet:
        import warnings

        warnings.filterwarnings("ignore")   # -q: errors only
    try:
        result = run_training(rec, run_dir=run_dir, resume=resume, show_progress=not quiet, console=console,
                              quiet=quiet)
    except KeyboardInterrupt:   # a second Ctrl-C, or one before the training loop: say what is left
        _interrupted(Path(run_dir or rec.train.run_dir or Path("runs") / rec.name))
    if not quiet and int(os.environ.get("RANK", "0")) == 0 and result.steps_run:
        _summary(result, console)


def _interrupted(run_dir: Path) -> None:
    """Exit 130 when the run can continue from a checkpoint, else 1 (nothing was saved)."""
    from moectl.errors import MoectlError
    from moectl.rundir import RunDir

    try:
        latest = RunDir(run_dir).checkpoints.latest()
    except MoectlError:
        latest = None
    if latest is not None:
        print(f"interrupted; continue from {latest} with --resume auto", file=sys.stderr)
        raise typer.Exit(130)
    print("interrupted before any checkpoint was saved: there is nothing to resume", file=sys.stderr)
    raise typer.Exit(1)


def _summary(r, console) -> None:
    from rich.table import Table

    from moectl.build import human, human_bytes

    t = Table(title=f"run summary ({r.run_dir})", title_justify="left", show_header=False)
    t.add_column(justify="left")
    t.add_column(justify="right")
    t.add_row("steps", f"{r.steps:,}")
    t.add_row("tokens", human(r.tokens))
    t.add_row("time", f"{r.seconds:.1f} s")
    t.add_row("tokens/s", f"{r.tokens_per_s:,.0f}")
    t.add_row("peak memory", human_bytes(r.peak_memory_bytes))
    if r.skipped_steps:
        t.add_row("skipped steps (non-finite)", str(r.skipped_steps))
    t.add_row("final validation loss", f"{r.final_val_loss:.4f} nats")
    t.add_row("validation unigram entropy", f"{r.val_unigram_entropy:.4f} nats")
    t.add_row("below unigram entropy", f"{r.val_unigram_entropy - r.final_val_loss:.4f} nats")
    console.print(t)
    sys.stdout.flush()
