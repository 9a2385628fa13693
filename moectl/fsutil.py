"""Writing files so that they are complete or absent: temp name, fsync, rename. JSON that moectl
writes follows one rule for numbers JSON cannot hold: NaN and infinities are written as null."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FULL_TEXTS = ("No space left", "os error 28", "StorageFull", "Disk quota exceeded", "os error 122")
_TORCH_WRITE_TEXTS = ("failed writing", "file write failed", "unexpected pos")


def disk_full(e: BaseException) -> bool:
    """Whether an error means the disk (or quota) is full, however the library reports it: an
    OSError, a safetensors error carrying the OS error, or PyTorch's writer failing mid-file."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(t in text for t in _FULL_TEXTS) or (
        isinstance(e, RuntimeError) and any(t in text for t in _TORCH_WRITE_TEXTS))


def free_space(path: Path | str) -> str:
    """'N MB free on the disk of PATH' for the nearest existing folder of `path`."""
    probe = Path(os.path.abspath(str(path)))
    while not probe.is_dir() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 1e6:,.1f} MB free on the disk of {probe}"
    except OSError:
        return "free space unknown"


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it is synced and renamed to `target`
    (which must not exist), on failure removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.parent / f".{target.name}.tmp-{temp_tag()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:   # numpy's short write ("N requested and M written") names no file or errno
            short = e.errno is None and "written" in str(e)
            raise OSError(errno.ENOSPC if short else e.errno, str(e), str(target)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def temp_tag() -> str:
    """What a temporary's name carries: this process and its host (`PID@host`), so that a process
    removes only the temporaries of dead processes of its own host (a cache may be shared)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def clean_stale(target: Path) -> None:
    """Remove the temporaries (`.<name>.tmp-PID@host`) of `target` that a killed process of this
    host left behind."""
    target = Path(target)
    prefix = f".{target.name}.tmp-"
    host = socket.gethostname()
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for p in entries:
        pid, _, where = p.name[len(prefix):].partition("@")
        if p.name.startswith(prefix) and where == host and pid.isdigit() and not pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` complete or not at all (a failure, a full disk included, leaves no temporary)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a file so that `dst` is the complete copy or what it was before."""
    def fill(f) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    _atomic_file(dst, fill)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Like `atomic_write_text`, for bytes (an image, say)."""
    _atomic_file(path, lambda f: f.write(data))


def _atomic_file(path: Path, fill) -> None:
    """Write `path` through `fill(file)` under a temporary name, synced, then renamed into place;
    on any failure the temporary is removed and `path` is what it was."""
    path = Path(path)
    clean_stale(path)
    tmp = path.parent / f".{path.name}.tmp-{temp_tag()}"
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, infinities) replaced by None, recursively: what
    moectl writes to JSON (which has no such numbers) and prints with --json."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """Indented JSON of `value` under the non-finite rule (`json_safe`), with a final newline."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON (`json_text`), complete or not at all."""
    atomic_write_text(path, json_text(value))
