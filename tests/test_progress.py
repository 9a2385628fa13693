"""Progress of long jobs: a plain line on stderr every so often when stderr is not a terminal (a log
file, a pipe), nothing when switched off, and `current()` for code deep inside a command."""

from __future__ import annotations

import io

from rich.console import Console

from moectl import progress
from moectl.progress import JobProgress


def _plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_plain_lines_without_a_terminal(capsys):
    with JobProgress(console=_plain_console(), every=0) as p:
        advance = p.task("tokenising", 4, unit="documents")
        advance(1)
        advance(3, info="1,234 tokens")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("tokenising: 1/4 documents (25%), ")
    assert lines[1].startswith("tokenising: 4/4 documents (100%), 1,234 tokens, ")
    assert lines[-1].endswith("(done)")


def test_quiet_when_off_or_quick(capsys):
    with JobProgress(enabled=False, console=_plain_console(), every=0) as p:
        p.task("x", 2)(2)
    with JobProgress(console=_plain_console(), every=3600) as p:   # a job shorter than the interval
        p.task("y", None)(5)
    assert capsys.readouterr().err == ""


def test_current_is_the_open_display():
    assert not progress.current().enabled
    with JobProgress(console=_plain_console()) as p:
        assert progress.current() is p
    assert not progress.current().enabled
