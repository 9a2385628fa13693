"""Where a run's measurements go: logs/metrics.jsonl, TensorBoard and the experiment trackers. The routing statistics
themselves are `moectl.core.stats`; the device's peaks are `moectl.profile.measure`."""

from __future__ import annotations

import json
import math
from typing import Any

from moectl.errors import MoectlError
from moectl.extras import install_hint
from moectl.fsutil import json_safe
from moectl.rundir import RunDir
from moectl.tracking import Status, Trackers


class MetricsLog:
    """logs/metrics.jsonl (one JSON object per line) and optionally TensorBoard. Rank 0 only."""

    def __init__(self, run_dir: RunDir, enabled: bool, tensorboard: bool, resume_step: int = 0):
        """Appends to the run's log (which the trainer has cut back to `resume_step`, the step
        training continues from: records of later steps came from an attempt that did not reach a
        checkpoint). TensorBoard events past that step are hidden likewise."""
        self.enabled = enabled
        self.tb = None
        self.trackers: Trackers | None = None
        if not enabled:
            return
        self.file = run_dir.open_metrics()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MoectlError("train.tensorboard needs the tensorboard package",
                                  hint=f"{install_hint('tb')}, or set train.tensorboard=false") from None
            # purge_step hides TensorBoard events past the resume point, like the JSON log.
            self.tb = SummaryWriter(str(run_dir.tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def attach(self, trackers: Trackers) -> None:
        """Send every record to these experiment trackers too (`moectl.tracking`)."""
        self.trackers = trackers

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(json_safe(record)) + "\n")   # NaN and infinities as null
        self.file.flush()
        if self.trackers is not None:
            self.trackers.log(record)
        if self.tb is not None:
            prefix = "eval" if record.get("type") == "eval" else "train"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
            for name, layer in record.get("layers", {}).items():
                for key in ("imbalance", "diversity", "entropy", "topk_mass", "dead"):
                    value = layer.get(key)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.tb.add_scalar(f"{prefix}/{key}/{name}", value, record["step"])

    def close(self, status: Status = "finished") -> None:
        """Close the log, TensorBoard and the trackers (which are told how the run ended)."""
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.trackers is not None:
                self.trackers.finish(status)
