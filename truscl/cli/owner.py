"""``truscl owner``: the task owner (model demander): create a task, then serve it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from truscl.cli.common import log_format_option, stop_on_signals


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
    log_format_option(run_parser)
    run_parser.set_defaults(handler=run)
    status = actions.add_parser(
        "status", help="the task's terms, progress, and the rounds its privacy budget allows"
    )
    status.add_argument("--config", type=Path, required=True, help="the owner's TOML file")
    status.add_argument("--json", type=Path, metavar="FILE", help="also write it here")
    status.set_defaults(handler=show_status)


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


def show_status(args: argparse.Namespace) -> int:
    from truscl.server.config import OwnerConfig
    from truscl.server.owner_service import owner_status

    status = owner_status(OwnerConfig.load(args.config))
    released = status["models_released"]
    anchored = status.get("rounds_anchored", f"unknown ({status.get('chain_error')})")
    holders = status["key_holders"]
    print(
        f"task      {status['task']}\n"
        f"keys      {status['he_mode']}"
        + (f" ({', '.join(holders)})" if holders else "")
        + f", minimum cohort {status['min_cohort']}\n"
        f"rounds    {status['rounds']} (quorum {status['quorum']}, "
        f"deadline {status['round_seconds']:g} s), {anchored} anchored, "
        f"latest model {released[-1] if released else 'none'}, "
        f"refused {status.get('refused_rounds', 'unknown') or 'none'}\n"
        f"privacy   the task spends epsilon {status['epsilon_task']:.3f} of each device's "
        f"budget {status['epsilon_budget']:g} (delta {status['delta']:g}); "
        f"the budget allows {status['rounds_budget_allows']} rounds"
    )
    if args.json:
        args.json.write_text(json.dumps(status, indent=2) + "\n")
    return 0
