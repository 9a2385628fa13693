"""What every command shares: error reporting, exit codes, splitting recipe arguments."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import io
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

RECIPE_HELP = ("A recipe file, a run folder (its config.yaml), or a shipped recipe name "
               "(see `moectl recipes list`).")
OVERRIDES_HELP = "Trailing dotted.key=value overrides, parsed as YAML and validated like the file."


def plain_log(console, style: str = "dim") -> Callable[[str], None]:
    """A log callback that prints messages as they are: never read as Rich markup, so a hint such
    as an install command with `[extra]` brackets, or a path, reaches the terminal intact."""
    from rich.text import Text

    return lambda msg: console.print(Text(str(msg), style=style))


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console(on_closed: Callable[[], None] | None = None):
    """The console of a command's standard output. With `on_closed`, output that nobody reads any
    more (a closed pipe such as `| head`, a closed terminal) is dropped and `on_closed` is called
    once, instead of an exception ending the command wherever it next prints."""
    from rich.console import Console

    if on_closed is None:
        return Console(highlight=False, soft_wrap=True)
    return Console(file=GuardedOutput(sys.stdout, on_closed), highlight=False, soft_wrap=True)


class GuardedOutput(io.TextIOBase):
    """A text stream that forwards to `stream` until a write or flush fails because the reader has
    gone (EPIPE, or EIO from a closed terminal); from then on the process's standard output is
    /dev/null (so nothing fails at exit either) and writes are dropped."""

    def __init__(self, stream, on_closed: Callable[[], None]):
        super().__init__()
        self.stream, self.on_closed, self.gone = stream, on_closed, False

    def _lost(self, err: OSError) -> None:
        if not isinstance(err, BrokenPipeError) and err.errno not in (errno.EPIPE, errno.EIO):
            raise err
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        self.on_closed()

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
                self.stream.flush()
            except OSError as err:
                self._lost(err)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as err:
                self._lost(err)

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


def fail(err) -> None:
    """Print a user-facing error to stderr and exit with its code. In a run of several processes
    an error they all raised is printed by the first only; one raised by a single process is
    printed by that process, with its rank."""
    from rich.markup import escape

    rank = os.environ.get("RANK", "0")
    if rank == "0" or not getattr(err, "agreed", False):
        prefix = "" if rank == "0" else f"[process {rank}] "
        stderr_console().print(f"[red]{escape(prefix + err.render())}[/]")
    parallel = sys.modules.get("moectl.train.parallel")
    if parallel is not None and getattr(parallel, "joined", False):
        # One of several processes that joined a process group: leave now. Tearing torch's process
        # group down at interpreter exit can deadlock (gloo's worker thread waits for the interpreter
        # lock the exiting thread holds), which would leave the run hanging after its message.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(err.exit_code)
    raise typer.Exit(err.exit_code)


def _paragraphs(doc: str | None) -> str | None:
    """A command's docstring as its --help shows it: paragraphs (split at blank lines) whose lines
    are joined, so the source can wrap them at its line width."""
    if doc is None:
        return None
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def handle_errors(fn: F) -> F:
    """Turn MoectlError into a clear message and its exit code; Ctrl-C into exit 130. (The command's
    docstring, its --help text, is unwrapped into paragraphs.)"""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moectl.errors import MoectlError

        try:
            return fn(*args, **kwargs)
        except MoectlError as e:
            fail(e)
        except OSError as e:
            err = os_error(e)
            if err is None:
                raise
            fail(err)
        except Exception as e:
            from moectl.fsutil import disk_full

            if disk_full(e):   # a write that no command-specific handler caught
                where = getattr(e, "filename", None)
                fail(MoectlError(f"no space left on the device{f' writing {where}' if where else ''} "
                                 f"({type(e).__name__}: {str(e).strip()[:160]})",
                                 hint="free some space (or write to another disk), then run the command again"))
            if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop from"):
                fail(MoectlError(f"{str(e).removeprefix('Symlink loop from').strip()} is a symbolic link in a loop "
                                 "(links that point at each other)", hint="give the real path"))
            if isinstance(e, RecursionError):
                fail(MoectlError("an input nests too deeply to read (RecursionError)",
                                 hint="the file is damaged or crafted; use the original"))
            if type(e).__name__ == "RouterContractError":   # a plugin's router (the engine's are tested)
                fail(MoectlError(str(e), hint="fix the router's forward, or leave that router out of the recipe"))
            if not (isinstance(e, (MemoryError, RuntimeError)) and out_of_memory(e)):
                raise
            what = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            fail(MoectlError(f"out of memory ({what})",
                             hint="use a smaller batch (train.batch_size, --batch-size), a shorter model.seq_len or a "
                                  "smaller model; train.activation_checkpointing: true saves activation memory"))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    wrapper.__doc__ = _paragraphs(fn.__doc__)
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def terminate_cleanly():
    """SIGTERM and SIGHUP stop the command the way Ctrl-C does (exit 130): the command's own
    clean-up runs, so a half-written output is removed instead of left behind."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                saved[sig] = signal.signal(sig, stop)
            except ValueError:   # not the main thread: leave the signals alone
                pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation failure (CPU or GPU), which the user can fix with
    smaller sizes, rather than a bug."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def os_error(e: OSError):
    """A MoectlError for what the file system refused (no space, no permission, no such folder),
    naming the path; None for other OS errors (which are bugs to report, with their traceback)."""
    import errno
    import shutil

    from moectl.errors import MoectlError

    path = e.filename or "?"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = ""
        probe = os.path.dirname(os.path.abspath(str(path))) if path != "?" else "."
        while probe and not os.path.isdir(probe):
            probe = os.path.dirname(probe)
        try:
            free = f" ({shutil.disk_usage(probe).free / 1e6:,.1f} MB free there)"
        except OSError:
            pass
        return MoectlError(f"no space left on the device while writing {path}{free}",
                           hint="free some space or write elsewhere (--run-dir, data.cache_dir, -o); complete "
                                "checkpoints and files written before are intact")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                   errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.ELOOP):
        return MoectlError(f"cannot write or read {path}: {e.strerror}",
                           hint="check the path and its permissions, or choose another place")
    return None


def pick_device(name: str):
    """The torch device a `--device` option names: auto (a GPU when there is one), cpu, cuda, cuda:N."""
    import torch

    from moectl.errors import MoectlError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoectlError(f"--device {name}: no CUDA device is available", hint="use --device cpu (or auto)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MoectlError(f"--device {name}: not a device", hint="use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise MoectlError(f"--device {name}: moectl runs on cpu or cuda", hint="use auto, cpu, cuda or cuda:N")
    return device


def single_process(command: str) -> None:
    """Refuse to run `command` as one of several launched processes (torchrun, accelerate), where
    every process would do the same work and write the same files."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS", "1")   # torchrun, or srun -n N
    if world.isdigit() and int(world) > 1:
        from moectl.errors import MoectlError

        err = MoectlError(f"moectl {command} runs in one process, not as one of {world} launched processes",
                          hint=f"run it directly: moectl {command} ...")
        err.agreed = True   # every process refuses alike; the first says so
        raise err
