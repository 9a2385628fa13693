"""What made a run: software versions, the working directory's git state, hardware, threads,
launcher and the command line. Training writes this record into every checkpoint's meta.json and
into logs/summary.json (`provenance`); `moectl compare` warns when compared runs differ in it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from moectl import __version__

# The fields of the record that make results differ when they differ (compare warns on these).
COMPARED = ("moectl", "torch", "cuda", "triton", "python", "git_commit", "git_dirty", "cpu", "gpu", "threads",
            "launcher", "world_size")


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(cwd: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the git work tree holding `cwd`; (None, None) outside one."""
    cwd = Path(cwd or Path.cwd())
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def launcher() -> str:
    """How this process was started: moectl's --nproc, torchrun, accelerate, SLURM, or directly."""
    env = os.environ
    if env.get("MOECTL_WORKER") == "1":
        return "moectl --nproc"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if any(k.startswith("ACCELERATE_") for k in env) and "LOCAL_RANK" in env:
        return "accelerate"
    if "SLURM_JOB_ID" in env:
        return "slurm"
    return "direct"


@lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    import torch  # here, not at the top: moectl.compare reads records without importing torch

    commit, dirty = git_state()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "moectl": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _package_version("triton"), "python": platform.python_version(),
        "git_commit": commit, "git_dirty": dirty, "cwd": str(Path.cwd()),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "gpu": f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else None,
        "launcher": launcher(), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def record(world_size: int) -> dict[str, Any]:
    """The reproducibility record of this process's run."""
    import torch

    return {**_static(), "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "world_size": world_size}


def differences(records: dict[str, dict[str, Any]]) -> list[str]:
    """For runs' records (by run name), one line per compared field whose value is not the same in
    all of them: 'torch: 2.13.0 (a, b), 2.11.0 (c)'. Runs without a record are left out."""
    known = {name: r for name, r in records.items() if isinstance(r, dict)}
    lines = []
    for key in COMPARED:
        values: dict[str, list[str]] = {}
        for name, r in known.items():
            values.setdefault(str(r.get(key)), []).append(name)
        if len(values) > 1:
            lines.append(f"{key}: " + ", ".join(f"{v} ({', '.join(names)})" for v, names in values.items()))
    return lines
