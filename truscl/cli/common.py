"""Argument types and helpers shared by the command groups."""

from __future__ import annotations

import argparse
import re
import signal
import threading

from truscl.logs import FORMATS

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
TASK = re.compile(r"0x[0-9a-fA-F]{64}")


def task_id(text: str) -> str:
    if not TASK.fullmatch(text):
        raise argparse.ArgumentTypeError("a task id is 0x and 64 hex digits")
    return text.lower()


def address(text: str) -> str:
    if not ADDRESS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0x and 40 hex digits)")
    return text


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM (systemd's stop) or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def log_format_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` after a service's command too (``truscl aggregator run --log-format
    json``), as well as before it; given in neither place, the text format."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=argparse.SUPPRESS,
        help="text (default), or json: one JSON object per line",
    )
