"""The ``truscl`` command line: one group of commands per role, each in its own module.

The command line and the demo launcher are the only code that composes roles; each module here
adds its commands to the parser and imports its role only when one of them runs, so
``truscl --help`` stays fast on a Pi.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from truscl import logs
from truscl.cli import agent, aggregator, audit, broker, chain, demo, guardian, owner, report
from truscl.errors import TrusclError

GROUPS = (demo, broker, chain, owner, guardian, aggregator, agent, audit, report)

LOG_FORMAT_HELP = "text (default), or json: one JSON object per line"
Handler = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="truscl",
        description="Trusted, private collaborative learning for IoT edge devices.",
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text", help=LOG_FORMAT_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)

    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    handler: Handler = args.handler
    try:
        return handler(args)
    except TrusclError as exc:
        print(f"truscl: {exc}", file=sys.stderr)
        return 1
