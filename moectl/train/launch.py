"""`moectl train --nproc N`: start N worker processes of this same command on this machine.

Each worker gets the usual distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), which accelerate reads; on CPU they talk through gloo. The workers run in a
session of their own, and the launcher forwards SIGINT, SIGTERM and SIGHUP to them exactly once
per signal, whether the signal came from a terminal's Ctrl-C (the launcher's process group) or
was sent to the launcher alone. The launcher exits with 130 when the workers stopped cleanly after
a signal, else with the exit code of the first worker that failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

WORKER_ENV = "MOECTL_WORKER"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1" or "LOCAL_RANK" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **{WORKER_ENV: "1"})
        env.setdefault("OMP_NUM_THREADS", str(threads))
        if rank:
            env["MOECTL_QUIET"] = "1"
        procs.append(subprocess.Popen([sys.executable, "-m", "moectl", *argv], env=env, start_new_session=True))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        codes: list[int | None] = [None] * nproc
        deadline, first_failure, failures = None, None, []
        seen_failed: set[int] = set()
        while any(c is None for c in codes):
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0, 130)]
            failures += [c for i, c in enumerate(codes) if c not in (None, 0, 130) and i not in seen_failed]
            seen_failed.update(i for i, c in enumerate(codes) if c not in (None, 0, 130))
            if first_failure is None and failed:
                first_failure = next((c for c in failed if c > 0), failed[0])
            if deadline is None and failed:
                deadline = time.monotonic() + 30   # one failed: the others get time to stop on their own
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = float("inf")
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first_failure is not None:
        # The process that failed names the cause; the others stop because it left, with exit 1,
        # and may be seen first (the failing one takes longer to exit). A more specific code (the
        # cause's, e.g. 2 for a user error) wins; a worker's own exit code beats a kill by signal.
        specific = [c for c in failures if c > 1]
        return specific[0] if specific else (first_failure if first_failure > 0 else 1)
    return 130 if 130 in codes else 0
