from __future__ import annotations

import json
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from logs/metrics.jsonl (log_every=1)."""
    return _by_step(run_dir, "train", "loss")


def evals(run_dir: Path) -> dict[int, float]:
    return _by_step(run_dir, "eval", "val_loss")


def _by_step(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    """One value per step: a step logged twice (e.g. by an attempt that was resumed) is an error."""
    out = {}
    for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == kind:
            assert rec["step"] not in out, f"step {rec['step']} logged twice in {run_dir}"
            out[rec["step"]] = rec[key]
    return out
