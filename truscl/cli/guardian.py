"""``truscl guardian``: a key guardian: join a task's key generation, then serve it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from truscl.cli.common import log_format_option, stop_on_signals


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    guardian = commands.add_parser(
        "guardian", help="a key guardian: hold a share of the task's key, decrypt its part"
    )
    actions = guardian.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="join the owner's key generation for the task (run while `owner init` runs)",
    )
    init.add_argument("--config", type=Path, required=True, help="the guardian's TOML file")
    init.set_defaults(handler=init_guardian)
    run_parser = actions.add_parser(
        "run", help="serve the task: decrypt its part of each anchored aggregate, once"
    )
    run_parser.add_argument("--config", type=Path, required=True, help="the guardian's TOML file")
    log_format_option(run_parser)
    run_parser.set_defaults(handler=run)
    status = actions.add_parser(
        "status", help="the key generation it joined, the rounds it decrypted, its refusals"
    )
    status.add_argument("--config", type=Path, required=True, help="the guardian's TOML file")
    status.add_argument("--json", type=Path, metavar="FILE", help="also write it here")
    status.set_defaults(handler=show_status)


def init_guardian(args: argparse.Namespace) -> int:
    from truscl.server.config import GuardianConfig
    from truscl.server.guardian_service import init_guardian

    config = GuardianConfig.load(args.config)
    record = init_guardian(config)
    print("0x" + record.transcript.context_hash.hex())  # alone on stdout, for scripts
    print(
        f"{config.name} holds its share of task {config.task}'s key "
        f"({len(record.terms.holders)} holders); now `truscl guardian run`",
        file=sys.stderr,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from truscl.server.config import GuardianConfig
    from truscl.server.guardian_service import run_guardian

    run_guardian(GuardianConfig.load(args.config), stop_on_signals())
    return 0


def show_status(args: argparse.Namespace) -> int:
    from truscl.server.config import GuardianConfig
    from truscl.server.guardian_service import guardian_status

    status = guardian_status(GuardianConfig.load(args.config))
    refusals = ", ".join(f"{k} {v}" for k, v in sorted(status["refusals"].items())) or "none"
    print(
        f"task      {status['task']}\n"
        f"guardian  {status['name']} of {', '.join(status['key_holders'])}\n"
        f"context   {status['context_hash']} (transcript {status['keygen_digest']})\n"
        f"decrypted rounds {status['rounds_decrypted'] or 'none'}\n"
        f"refused   {refusals}"
    )
    if args.json:
        args.json.write_text(json.dumps(status, indent=2) + "\n")
    return 0
