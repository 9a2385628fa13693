"""The training progress display: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

from typing import Any

from rich import progress as bars
from rich.console import Console


class Progress:
    """A rich progress bar when interactive; plain log lines otherwise."""

    def __init__(self, enabled: bool, total: int, start: int, console) -> None:
        self.enabled = enabled
        self.console = console or Console()
        self.live = enabled and self.console.is_terminal
        self.total, self.start = total, start
        self.info = ""
        if self.live:
            # Two lines: the bar, then the metrics (too wide to share a line on a narrow terminal).
            self.bar = bars.Progress(bars.TextColumn("[bold]train[/]"), bars.BarColumn(bar_width=30),
                                     bars.MofNCompleteColumn(), bars.TimeRemainingColumn(), console=self.console)
            self.bar.columns = (*self.bar.columns, bars.TextColumn("\n{task.fields[info]}", justify="left"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def update(self, step: int, r: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if "tokens_per_s" in r:
            parts = [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s",
                     f"MFU {100 * r['mfu']:.1f}%"]
            if "load_balance" in r:
                parts += [f"aux {r['load_balance']:.3f}", f"z {r.get('z_loss', 0):.2f}",
                          f"imb {r['imbalance_max']:.2f}"]
            self.info = "  ".join(parts)
            if not self.live:
                self.console.print(f"step {step}/{self.total}  {self.info}", highlight=False)
        if self.live:
            self.bar.update(self.task, completed=step, info=self.info)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
