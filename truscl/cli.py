"""The ``truscl`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from pathlib import Path

from truscl.errors import ChainError, ConfigError, TrusclError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="truscl", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run a whole task on this machine: broker, chain, aggregator, owner, devices",
    )
    demo.add_argument("--devices", type=int, default=5, help="simulated devices (default 5)")
    demo.add_argument("--rounds", type=int, default=10, help="training rounds (default 10)")
    demo.add_argument("--seed", type=int, default=7, help="simulator seed (rooms and data)")
    demo.add_argument("--json", type=Path, metavar="FILE", help="also write the summary here")
    demo.add_argument("--workdir", type=Path, help="keep keys, archive and logs here")
    demo.add_argument(
        "--max-message", type=int, default=128 * 1024, help="largest MQTT payload in bytes"
    )
    demo.add_argument(
        "--rpc",
        metavar="URL",
        help="use a development node (e.g. anvil) instead of the in-process EVM; "
        "with --workdir, `truscl audit` can check the run afterwards",
    )
    demo.add_argument(
        "--round-seconds",
        type=float,
        default=20.0,
        help="round deadline: after it a round closes with a quorum (default 20)",
    )
    demo.add_argument(
        "--drop-device",
        type=int,
        metavar="ROUND",
        help="stop the last device before this round, to show a round closing at quorum",
    )

    agent = commands.add_parser(
        "agent", help="run the device agent as a service (systemd/truscl-agent.service)"
    )
    agent.add_argument("--config", type=Path, required=True, help="the agent's TOML file")

    audit = commands.add_parser(
        "audit", help="check a task's archived rounds against the chain (JSON-RPC node)"
    )
    audit.add_argument("--rpc", required=True, help="JSON-RPC URL of the chain")
    audit.add_argument("--contract", required=True, help="address of the truscl contract")
    audit.add_argument("--task", required=True, type=_task_id, help="0x-prefixed task id")
    audit.add_argument("--archive", type=Path, required=True, help="the aggregator's archive")
    audit.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "agent":
            return _agent(args)
        return _audit(args)
    except TrusclError as exc:
        print(f"truscl: {exc}", file=sys.stderr)
        return 1


def _task_id(text: str) -> str:
    if not re.fullmatch(r"0x[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError("a task id is 0x and 64 hex digits")
    return text.lower()


def _demo(args: argparse.Namespace) -> int:
    from truscl.demo import DemoConfig, run_demo

    config = DemoConfig(
        devices=args.devices,
        rounds=args.rounds,
        seed=args.seed,
        max_message=args.max_message,
        workdir=args.workdir,
        drop_device_at=args.drop_device,
        round_seconds=args.round_seconds,
        rpc=args.rpc,
    )
    summary = run_demo(config, out=sys.stdout)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["audit"]["verified"] == summary["audit"]["total"]
    return 0 if ok else 1


def _agent(args: argparse.Namespace) -> int:
    from truscl.agent.config import AgentConfig
    from truscl.agent.service import run_agent

    config = AgentConfig.load(args.config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_agent(config, stop)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from web3 import Web3

    from truscl.chain import ChainClient
    from truscl.server.archive import Archive
    from truscl.server.audit import audit_task

    if not (args.archive / "blobs").is_dir():
        raise ConfigError(f"{args.archive} is not an aggregator archive")
    w3 = Web3(Web3.HTTPProvider(args.rpc, request_kwargs={"timeout": 10}))
    if not w3.is_connected():
        raise ChainError(f"no JSON-RPC node answers at {args.rpc}")
    chain = ChainClient.at(w3, args.contract)
    report = audit_task(chain, Archive(args.archive), args.task)
    for item in report.rounds:
        status = "verified" if item.verified else "FAILED: " + "; ".join(item.problems)
        print(f"round {item.round:3d}  {item.updates:3d} updates  {status}")
    print(f"audit: {report.verified}/{report.total} rounds verified")
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.verified == report.total else 1


if __name__ == "__main__":
    sys.exit(main())
