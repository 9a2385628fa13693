"""The benchmark scripts still run (at toy sizes; they time nothing here)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_expert_backends_bench_runs():
    proc = subprocess.run([sys.executable, "bench/experts.py", "--tokens", "256", "--d-model", "64", "--hidden", "64",
                           "--experts", "4", "--top-k", "2", "--reps", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "speed-up" in proc.stdout and "rel.diff" in proc.stdout
