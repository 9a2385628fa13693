"""Stage labels of the engine, for `moectl profile`.

The engine wraps each part of a step in `record_stage(name)`: router, dispatch, experts, combine,
shared experts, attention, norms, head + loss (and the trainer: optimizer; expert parallelism:
exchange). Outside a profile the labels are plain no-op context managers (nothing is recorded,
nothing is allocated, and compiled graphs see no profiler calls); inside `profiling_stages()` they
are torch.profiler ranges named `moectl::<stage>`, so a trace shows the real layer's work under the stage it belongs to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PREFIX = "moectl::"
STAGES = ("embedding", "attention", "norms", "router", "dispatch", "exchange", "experts", "combine",
          "shared_experts", "dense_ffn", "head_loss", "optimizer")

_active = False
_null = contextlib.nullcontext()


def record_stage(name: str) -> contextlib.AbstractContextManager:
    """A profiler range `moectl::<name>` while stages are being profiled, else a no-op."""
    if not _active:
        return _null
    return torch.profiler.record_function(PREFIX + name)


@contextlib.contextmanager
def profiling_stages() -> Iterator[None]:
    """Turn the engine's stage labels on for the duration (used by `moectl profile`)."""
    global _active
    before, _active = _active, True
    try:
        yield
    finally:
        _active = before
