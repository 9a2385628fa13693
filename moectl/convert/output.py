"""Output folders of `moectl convert`: written under a temporary name next to the target and renamed
into place, so a folder is complete or absent; an existing non-empty one is replaced only with
--force (and only once the new one is complete)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moectl.errors import MoectlError
from moectl.fsutil import clean_stale, fsync_dir, fsync_tree, temp_tag


def check_target(out: Path, force: bool, source: Path | None = None) -> None:
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise MoectlError(f"the output folder {out} is the input", hint="write the result to another folder")
    if out.exists() and not out.is_dir():
        raise MoectlError(f"{out} exists and is not a folder", hint="choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MoectlError(f"{out} is not empty", hint="choose another output folder, or pass --force to replace it")
    if source is not None and out.exists() and Path(source).resolve().is_relative_to(out.resolve()):
        raise MoectlError(f"the input {source} lies inside the output folder {out}",
                          hint="write the result to another folder")


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
        fsync_tree(tmp)
        if out.exists():
            if not force and any(out.iterdir()):
                raise MoectlError(f"{out} was filled by something else meanwhile", hint="run again with --force")
            old = out.parent / f".{out.name}.old-{temp_tag()}"
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            old = None
    except OSError as e:
        _put_back(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise MoectlError(f"no space left on the device while writing {out}; nothing was written",
                              hint="free some space, or write to another disk") from None
        raise MoectlError(f"cannot write {out} ({e.strerror or e}); nothing was written",
                          hint="choose a folder you can write to") from None
    except BaseException:
        _put_back(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_back(old: Path | None, out: Path) -> None:
    """The folder --force was replacing goes back to its place when the new one did not land."""
    if old is not None and old.exists() and not out.exists():
        os.rename(old, out)
