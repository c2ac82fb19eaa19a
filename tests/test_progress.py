"""Progress of long work: a bar on a terminal, plain lines when not."""

from __future__ import annotations

import io
import os

from truscl.progress import Progress


def test_without_a_terminal_each_step_is_a_plain_line() -> None:
    # Prepare
    stream, out = io.StringIO(), io.StringIO()
    # Execute
    with Progress("audit", 0, stream) as progress:
        for done in (1, 2):
            progress.advance(f"round {done}", total=2)
            progress.print(f"result {done}", out)
    with Progress("rounds", 2, stream, plain=False) as quiet:
        quiet.advance()
    # Assert: no escape codes; the work's own lines go where it sends them
    assert stream.getvalue() == "audit: 1/2 round 1\naudit: 2/2 round 2\n"
    assert out.getvalue() == "result 1\nresult 2\n"


def test_on_a_terminal_a_bar_counts_the_steps() -> None:
    # Prepare: a pseudo-terminal, read from its other end
    controller, terminal = os.openpty()
    stream = open(terminal, "w", encoding="utf-8")
    try:
        # Execute
        with Progress("rounds", 3, stream, plain=False) as progress:
            for _ in range(3):
                progress.advance()
        stream.flush()
        shown = os.read(controller, 65536).decode(errors="replace")
    finally:
        stream.close()
        os.close(controller)
    # Assert: rich drew the bar (escape codes), ending at 3 of 3
    assert "\x1b[" in shown
    assert "rounds" in shown and "3/3" in shown
