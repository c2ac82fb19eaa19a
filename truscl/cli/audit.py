"""``truscl audit``: check a task's archived rounds against the chain; needs no key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from truscl.cli.common import task_id
from truscl.errors import ConfigError


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", help="check a task's archived rounds against the chain (JSON-RPC node)"
    )
    audit.add_argument("--rpc", required=True, help="JSON-RPC URL of the chain")
    audit.add_argument("--contract", required=True, help="address of the truscl contract")
    audit.add_argument("--task", required=True, type=task_id, help="0x-prefixed task id")
    audit.add_argument("--archive", type=Path, required=True, help="the aggregator's archive")
    audit.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")
    audit.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from truscl.chain import ChainClient
    from truscl.chain.rpc import connect
    from truscl.server.archive import Archive
    from truscl.server.audit import audit_task

    if not (args.archive / "blobs").is_dir():
        raise ConfigError(f"{args.archive} is not an aggregator archive")
    chain = ChainClient.at(connect(args.rpc), args.contract)
    report = audit_task(chain, Archive(args.archive), args.task)
    for item in report.rounds:
        status = "verified" if item.verified else "FAILED: " + "; ".join(item.problems)
        print(f"round {item.round:3d}  {item.updates:3d} updates  {status}")
    print(f"audit: {report.verified}/{report.total} rounds verified")
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.verified == report.total else 1
