"""`cynchrod sync` progress on a terminal: one line, redrawn in place, cleared at the end."""

from __future__ import annotations

import io

from cynchrod.cli import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_redrawn_line() -> None:
    out = Terminal()
    progress = Progress(out)
    progress(1, 300, "create default/a1: missing")
    progress(2, 300, "create default/a2: missing")
    progress.done()
    assert out.getvalue() == ("\r\x1b[K[1/300] create default/a1: missing"
                              "\r\x1b[K[2/300] create default/a2: missing\r\x1b[K")
    assert "\n" not in out.getvalue()


def test_a_pipe_gets_plain_lines() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress(1, 2, "stop default/a")
    progress(2, 2, "default/b")
    progress.done()
    assert out.getvalue() == "[1/2] stop default/a\n[2/2] default/b\n"
