"""`moectl train`: train a recipe on CPU, one GPU, or several processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from moectl.cli.common import OVERRIDES_HELP, RECIPE_HELP, handle_errors, stdout_console
from moectl.rundir import default_run_path


@handle_errors
def train(
    recipe: str = typer.Argument(..., help=RECIPE_HELP, metavar="RECIPE"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
    resume: str = typer.Option("auto", "--resume", help="'auto': continue from the run's latest checkpoint "
                               "if there is one; 'never': start fresh (refuses a run folder with checkpoints); "
                               "or a checkpoint / run folder to start from."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run folder (default: train.run_dir; else RECIPE itself when "
                                 "it is a folder; else runs/<name>, or runs/<name>-seed<S> when a seed=S override "
                                 "differs from the recipe's seed). With --seeds: the parent of one folder per seed."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine "
                              "(gloo on CPU, NCCL on GPUs). torchrun and `accelerate launch --multi_gpu` work "
                              "too (see docs/training.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines; errors only."),
    seeds: str = typer.Option(None, "--seeds", help="Train one run per seed, e.g. --seeds 0,1,2: each in its own "
                              "folder, one after another or --jobs at a time; `moectl compare` takes the folders "
                              "directly."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="With --seeds: runs trained at once, each with cores / jobs "
                             "threads."),
) -> None:
    """Train a recipe's model: data preparation, training, validation and checkpoints in one run folder.

    Exit codes: 0 done (also when the run had finished already: nothing is rewritten), 1 runtime failure (e.g. a
    non-finite loss) or interrupted before any checkpoint was saved, 2 bad recipe, data or run folder, 130
    interrupted with a checkpoint to continue from (--resume auto). Ctrl-C, SIGTERM, a closed terminal (SIGHUP)
    and output nobody reads any more (`| head`) all stop the run at the end of a step, with a checkpoint."""
    from moectl.recipe.load import load_recipe
    from moectl.train.launch import is_worker, launch

    if seeds is not None:
        raise typer.Exit(train_seeds(recipe, overrides or [], parse_seeds(seeds), jobs, run_dir, resume, nproc,
                                     quiet))
    rec = load_recipe(recipe, overrides or [])
    if run_dir is None and rec.train.run_dir is None:
        if Path(recipe).is_dir():
            run_dir = Path(recipe)   # a run folder (or a `moectl convert` folder) trains in place
        elif rec.seed != load_recipe(recipe).seed:   # a seed of the recipe's other than its own
            run_dir = default_run_path(rec.name, rec.seed)
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
        _interrupted(Path(run_dir or rec.train.run_dir or default_run_path(rec.name)))
    if not quiet and int(os.environ.get("RANK", "0")) == 0 and result.steps_run:
        _summary(result, console)


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else is a user error that says what is wrong."""
    from moectl.errors import MoectlError

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MoectlError(f"--seeds {text!r}: not a comma-separated list of integers",
                          hint="e.g. --seeds 0,1,2") from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise MoectlError(f"--seeds {text!r}: give one or more seeds from 0 to 2**32 - 1", hint="e.g. --seeds 0,1,2")
    return seeds


def train_seeds(recipe: str, overrides: list[str], seeds: list[int], jobs: int, parent: Path | None, resume: str,
                nproc: int, quiet: bool) -> int:
    """`moectl train RECIPE seed=S ...` for each seed, `jobs` at a time with cores / jobs threads each.
    Folders: PARENT/seed<S> with --run-dir PARENT, else each seed's default folder. Returns the
    first failing run's exit code (130 when one was interrupted), else 0."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from moectl.errors import MoectlError

    if len(set(seeds)) != len(seeds):
        raise MoectlError(f"--seeds gives a seed twice: {seeds}", hint="give each seed once")
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise MoectlError("--seeds and a seed=S override both set the seed", hint="drop the seed=S override")
    from moectl.recipe.load import load_recipe

    load_recipe(recipe, [*overrides, f"seed={seeds[0]}"])   # a bad recipe is one error, not one per seed
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if jobs > 1 else dict(os.environ)

    def one(seed: int) -> int:
        argv = [sys.executable, "-m", "moectl", "train", recipe, *overrides, f"seed={seed}", "--resume", resume,
                "--nproc", str(nproc)]
        if parent is not None:
            argv += ["--run-dir", str(parent / f"seed{seed}")]
        if quiet or jobs > 1:   # several runs at once: one progress display would garble the others
            argv.append("--quiet")
        print(f"seed {seed}: {' '.join(argv[3:])}", file=sys.stderr, flush=True)
        code = subprocess.run(argv, env=env).returncode
        print(f"seed {seed}: {'done' if code == 0 else f'exit code {code}'}", file=sys.stderr, flush=True)
        return code

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            codes = list(pool.map(one, seeds))
    except KeyboardInterrupt:
        return 130
    failed = [c for c in codes if c != 0]
    return (130 if 130 in failed else failed[0]) if failed else 0


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
    if r.mfu_peak:
        t.add_row("MFU", f"{100 * r.mfu:.1f}% of {r.mfu_peak}")
    if r.skipped_steps:
        t.add_row("skipped steps (non-finite)", str(r.skipped_steps))
    t.add_row("final validation loss", f"{r.final_val_loss:.4f} nats")
    if r.val_tokens:
        whole = " (the whole validation split)" if r.val_tokens == r.val_split_tokens else (
            f" of {r.val_split_tokens:,} (train.eval_batches; moectl eval: all)")
        t.add_row("validation tokens", f"{r.val_tokens:,}{whole}")
    t.add_row("validation unigram entropy", f"{r.val_unigram_entropy:.4f} nats")
    gap = r.val_unigram_entropy - r.final_val_loss   # a model that learned anything is below it
    t.add_row("below unigram entropy" if gap >= 0 else "above unigram entropy", f"{abs(gap):.4f} nats")
    console.print(t)
    sys.stdout.flush()
