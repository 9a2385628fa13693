from __future__ import annotations

import json
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from logs/metrics.jsonl (log_every=1)."""
    out = {}
    for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def evals(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "eval":
            out[rec["step"]] = rec["val_loss"]
    return out
