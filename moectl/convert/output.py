"""Output folders of `moectl convert`: written under a temporary name next to the target and renamed
into place, so a folder is complete or absent.

The policy for an existing OUT: an empty folder is used; a non-empty one is replaced only with
--force, only once the new one is complete, and only when moectl wrote it (it holds the marker
file `.moectl-output`, or is an older moectl export or import). Whatever --force says, OUT may never
be an input, lie inside an input's run folder or hold an input, be a run folder, or be the current
folder or one of its parents."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moectl.errors import MoectlError
from moectl.fsutil import clean_stale, disk_full, free_space, fsync_dir, fsync_tree, temp_tag
from moectl.rundir import CHECKPOINTS, CONVERT_INFO, LOGS, RunDir

MARKER = ".moectl-output"   # in every folder convert writes: what --force may replace
ELSEWHERE = "write the result to another folder"


def written_by_moectl(folder: Path) -> bool:
    """A folder `moectl convert` wrote (and so may replace with --force): it holds the marker, or it
    is an older export (config.json naming moectl's version) or import (convert.json). Never a run."""
    folder = Path(folder)
    if (folder / CHECKPOINTS).exists() or (folder / LOGS).exists():
        return False
    if (folder / MARKER).is_file() or (folder / CONVERT_INFO).is_file():
        return True
    try:
        return "moectl_version" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _run_of(path: Path) -> Path:
    """The run folder an input belongs to (a checkpoint's run, the run of a `latest` file), or itself."""
    run = RunDir.of_checkpoint(path) or RunDir.of_latest_file(path)
    return run.path.resolve() if run is not None else path


def check_target(out: Path, force: bool, source: Path | None = None) -> None:
    out = Path(out)
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or cwd.is_relative_to(target):
        raise MoectlError(f"the output folder {out} is the current folder or holds it", hint=ELSEWHERE)
    if source is not None:
        src = Path(source).resolve()
        if target == src:
            raise MoectlError(f"the output folder {out} is the input", hint=ELSEWHERE)
        if src.is_relative_to(target):
            raise MoectlError(f"the input {source} lies inside the output folder {out}", hint=ELSEWHERE)
        for inside in {src, _run_of(src)}:
            if target.is_relative_to(inside):
                raise MoectlError(f"the output folder {out} lies inside the input {inside}, whose files it could "
                                  "replace", hint=ELSEWHERE)
    if out.exists() and not out.is_dir():
        raise MoectlError(f"{out} exists and is not a folder", hint="choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise MoectlError(f"{out} is not empty", hint="choose another output folder, or pass --force to replace "
                              "a folder moectl convert wrote")
        if not written_by_moectl(out):
            raise MoectlError(f"{out} holds files moectl did not write, so --force does not replace it",
                              hint="choose a new or empty output folder (or remove it yourself)")


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out` (replacing it with `force`)."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{temp_tag()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise MoectlError(f"cannot create {out} ({e.strerror or e})",
                          hint="choose a folder you can write to") from None
    old = None
    try:
        yield tmp
        (tmp / MARKER).write_text("written by moectl convert; `--force` may replace this folder\n")
        fsync_tree(tmp)
        if out.exists():
            if any(out.iterdir()) and not (force and written_by_moectl(out)):
                raise MoectlError(f"{out} was filled by something else meanwhile", hint="choose another output folder")
            old = out.parent / f".{out.name}.old-{temp_tag()}"
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            old = None
    except BaseException as e:
        _put_back(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):   # an OSError, or the safetensors / torch writer's own error
            raise MoectlError(f"no space left on the device while writing {out}; nothing was written "
                              f"({free_space(out.parent)})", hint="free some space, or write to another disk") from None
        if isinstance(e, OSError):
            raise MoectlError(f"cannot write {out} ({e.strerror or e}); nothing was written",
                              hint="choose a folder you can write to") from None
        raise


def _put_back(old: Path | None, out: Path) -> None:
    """The folder --force was replacing goes back to its place when the new one did not land."""
    if old is not None and old.exists() and not out.exists():
        os.rename(old, out)
