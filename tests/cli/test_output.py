"""A command's standard output when nobody reads it any more: dropped, reported once, no exception."""

from __future__ import annotations

import os

from moectl.cli.common import GuardedOutput, stdout_console


def test_a_closed_pipe_is_reported_once_and_later_output_dropped():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    calls = []
    out = GuardedOutput(stream, lambda: calls.append(1))
    out.write("first line\n")
    assert os.read(read_end, 100) == b"first line\n"
    os.close(read_end)                       # the reader goes away (`| head` exits)
    assert out.write("second line\n") == len("second line\n")
    out.write("third line\n")
    out.flush()
    assert calls == [1] and out.gone and not out.isatty()
    stream.write("still fine\n")             # the descriptor now leads to /dev/null
    stream.flush()
    stream.close()


def test_the_console_without_a_guard_is_plain():
    assert not isinstance(stdout_console().file, GuardedOutput)
    assert isinstance(stdout_console(on_closed=lambda: None).file, GuardedOutput)
