"""Progress of long work (the demo's rounds, an audit): a bar on a terminal, plain lines not.

On a terminal, rich draws a bar that lines printed through :meth:`Progress.print` scroll
above; piped into a file or a CI log, there is no bar and each step is one plain line (or
none, when the work prints its own line per step), so logs stay readable.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """``total`` steps of ``what``, shown on ``stream`` (stderr: stdout stays for results).

    ``plain`` says whether a step prints a plain line when ``stream`` is not a terminal;
    work that prints its own line per step (the demo's rounds) turns it off."""

    def __init__(
        self, what: str, total: int, stream: TextIO | None = None, plain: bool = True
    ) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.plain = plain
        self._bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def advance(self, note: str = "", total: int | None = None) -> None:
        """One step done; ``note`` says what this one was; ``total`` corrects the count of
        steps (work that learns it only once under way)."""
        self.done += 1
        self.total = self.total if total is None else total
        if self._bar is not None:
            description = f"{self.what} ({note})" if note else self.what
            self._bar.update(self._task, advance=1, total=self.total, description=description)
        elif self.plain:
            print(f"{self.what}: {self.done}/{self.total}" + (f" {note}" if note else ""),
                  file=self.stream, flush=True)  # fmt: skip

    def print(self, line: str, out: TextIO) -> None:
        """``line`` to ``out``, above the bar when both are on the terminal."""
        if self._bar is not None and out.isatty():
            self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            print(line, file=out, flush=True)
