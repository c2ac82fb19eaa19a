"""``truscl owner``: the task owner (model demander): create a task, then serve it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from truscl.cli.common import stop_on_signals


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    owner = commands.add_parser("owner", help="the task owner: init a task, run the service")
    actions = owner.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="make the HE keys, create the task on chain from the task file, publish it",
    )
    init.add_argument("--config", type=Path, required=True, help="the owner's TOML file")
    init.set_defaults(handler=init_task)
    run_parser = actions.add_parser(
        "run", help="serve the task: check, decrypt and release each round's model"
    )
    run_parser.add_argument("--config", type=Path, required=True, help="the owner's TOML file")
    run_parser.set_defaults(handler=run)


def init_task(args: argparse.Namespace) -> int:
    from truscl.server.config import OwnerConfig
    from truscl.server.owner_service import init_task

    config = OwnerConfig.load(args.config)
    spec = init_task(config)
    print(spec.task)  # alone on stdout, for scripts: TASK=$(truscl owner init ...)
    print(
        f"task {spec.task} created: {spec.rounds} rounds, quorum {spec.quorum}; "
        f"give this id to the aggregator and the devices, then `truscl owner run`",
        file=sys.stderr,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from truscl.server.config import OwnerConfig
    from truscl.server.owner_service import run_owner

    run_owner(OwnerConfig.load(args.config), stop_on_signals())
    return 0
