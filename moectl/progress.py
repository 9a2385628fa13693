"""Progress of long jobs that are not training (tokenising, evaluating, converting): a Rich bar on
stderr when stderr is a terminal; otherwise a plain line on stderr every `every` seconds and at the
end of each task, so a job whose output goes to a log file or a pipe still shows that it moves.
Training has its own display (`moectl.train.progress`).

A command opens one `JobProgress`; code deep inside it reports through `current()` without being
handed the display (reading a model's shards, writing them), and reports nothing when no command
opened one."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class JobProgress:
    """`with JobProgress(enabled) as p: advance = p.task("tokenising", total)`; then `advance(n)`.
    `total` may be None (unknown); `info` adds a short text after the count (`advance(n, info=...)`)."""

    def __init__(self, enabled: bool = True, every: float = 30.0, console: Console | None = None):
        self.enabled = enabled
        self.every = every
        self.console = console or Console(stderr=True)
        self.bar: Progress | None = None
        self.plain: list[dict[str, Any]] = []

    def __enter__(self) -> JobProgress:
        self._token = _current.set(self)
        if self.enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                                transient=True)
            self.bar.start()
        return self

    def task(self, label: str, total: int | None, unit: str = "") -> Callable[..., None]:
        if not self.enabled:
            return lambda n=1, info=None: None
        if self.bar is not None:
            bar = self.bar
            task = bar.add_task(label, total=total, info="")

            def advance(n: int = 1, info: str | None = None) -> None:
                bar.update(task, advance=n, **({"info": info} if info is not None else {}))

            return advance
        state = {"label": label, "total": total, "unit": unit, "done": 0, "info": "", "t0": time.monotonic(),
                 "last": time.monotonic()}
        self.plain.append(state)

        def advance_plain(n: int = 1, info: str | None = None) -> None:
            state["done"] += n
            if info is not None:
                state["info"] = info
            now = time.monotonic()
            if now - state["last"] >= self.every:
                state["last"] = now
                self._line(state)

        return advance_plain

    def _line(self, state: dict[str, Any], end: bool = False) -> None:
        done, total, unit = state["done"], state["total"], state["unit"]
        count = f"{done:,}/{total:,}" if total else f"{done:,}"
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        info = f", {state['info']}" if state["info"] else ""
        elapsed = time.monotonic() - state["t0"]
        print(f"{state['label']}: {count}{(' ' + unit) if unit else ''}{pct}{info}, {elapsed:,.0f} s"
              + (" (done)" if end else ""), file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        _current.reset(self._token)
        if self.bar is not None:
            self.bar.stop()
        elif exc[0] is None:
            for state in self.plain:   # the last word on each task, if it ran long enough to report at all
                if time.monotonic() - state["t0"] >= self.every:
                    self._line(state, end=True)


_current: ContextVar[JobProgress | None] = ContextVar("moectl_progress", default=None)
_OFF = JobProgress(enabled=False)


def current() -> JobProgress:
    """The display the running command opened, or one that shows nothing."""
    return _current.get() or _OFF
