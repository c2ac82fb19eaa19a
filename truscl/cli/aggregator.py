"""``truscl aggregator``: the aggregator service of one task."""

from __future__ import annotations

import argparse
from pathlib import Path

from truscl.cli.common import log_format_option, stop_on_signals


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    aggregator = commands.add_parser("aggregator", help="the aggregator: run the service")
    actions = aggregator.add_subparsers(dest="action", required=True, metavar="ACTION")
    run_parser = actions.add_parser(
        "run", help="verify, sum, archive and anchor the updates of a task's rounds"
    )
    run_parser.add_argument("--config", type=Path, required=True, help="the aggregator's TOML file")
    log_format_option(run_parser)
    run_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from truscl.server.aggregator_service import run_aggregator
    from truscl.server.config import AggregatorConfig

    run_aggregator(AggregatorConfig.load(args.config), stop_on_signals())
    return 0
