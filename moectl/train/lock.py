"""One training per run folder: an advisory lock on the run's lock file (`RunDir.lock_file`), held
while a training writes.

The lock is an `flock` on the open file, so the kernel drops it when its process dies however it
dies: a lock left by a killed training is stale by construction and the next one takes it over.
The file records who holds it (pid, host, start time) for the message another training gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from moectl.errors import MoectlError
from moectl.rundir import RunDir


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).lock_file
        self._fd: int | None = None
        self._times: tuple[int, int] | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            before = self.path.stat() if self.path.exists() else None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MoectlError(f"cannot create the run folder's lock {self.path} ({e.strerror or e})",
                              hint="choose a run folder you can write to (--run-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise MoectlError(f"{self.path.parent} is being trained by another process ({holder})",
                              hint="wait for it to finish, or train elsewhere with --run-dir") from None
        except OSError:   # a file system without locks: go on unlocked rather than refuse to train
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        # On release the file gets its times back, so a training that changes nothing (a rerun of a
        # finished run) leaves the run folder exactly as it was.
        self._times = (before.st_atime_ns, before.st_mtime_ns) if before is not None else None
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            if self._times is not None:
                os.utime(self._fd, ns=self._times)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are unreadable"
