"""``truscl agent``: the device agent: provision a device, run it (systemd's
truscl-agent.service runs ``agent run``), and see what it has done."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from truscl.cli.common import address, log_format_option, stop_on_signals, task_id


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = commands.add_parser("agent", help="the device agent: provision, run, status")
    actions = agent.add_subparsers(dest="action", required=True, metavar="ACTION")

    provision = actions.add_parser(
        "provision",
        help="make the device key (0600), print the address to register, write agent.toml",
    )
    provision.add_argument("--out", type=Path, required=True, help="the device's folder")
    provision.add_argument("--name", help="shown in logs (default: the address)")
    provision.add_argument("--task", type=task_id, help="the task id from `truscl owner init`")
    provision.add_argument("--rpc", default="http://127.0.0.1:8545", help="JSON-RPC URL")
    where = provision.add_mutually_exclusive_group()
    where.add_argument("--contract", type=address, help="the truscl contract's address")
    where.add_argument(
        "--deployment", type=Path, help="a record of `truscl chain deploy` (address, rpc)"
    )
    provision.add_argument(
        "--broker-identity",
        type=Path,
        metavar="DIR",
        help="this device's folder from `truscl broker provision` (clients/<address>): "
        "its certificate, key and login are copied into the device's folder",
    )
    provision.add_argument(
        "--broker-host", help="the broker's host name (default: from the identity)"
    )
    provision.add_argument("--broker-port", type=int, help="the broker's port")
    provision.add_argument(
        "--hardware", default="pi", help='hardware backend: "pi" or "simulated" (default pi)'
    )
    provision.set_defaults(handler=provision_device)

    run_parser = actions.add_parser("run", help="run the agent as a service")
    run_parser.add_argument(
        "--config",
        type=Path,
        required=True,
        action="append",
        help="the agent's TOML file; give several to run several devices in one process",
    )
    log_format_option(run_parser)
    run_parser.set_defaults(handler=run)

    status = actions.add_parser("status", help="what the agent has done, from its state")
    status.add_argument("--config", type=Path, required=True, help="the agent's TOML file")
    status.add_argument("--json", type=Path, metavar="FILE", help="also write it here")
    status.set_defaults(handler=show_status)


def provision_device(args: argparse.Namespace) -> int:
    from truscl.agent.provision import NO_CONTRACT, NO_TASK, device_broker, provision_agent

    rpc, contract = args.rpc, args.contract or NO_CONTRACT
    if args.deployment is not None:
        from truscl.chain.deployment import Deployment

        deployment = Deployment.load(args.deployment)
        contract, rpc = deployment.address, deployment.rpc_url or rpc
    device = provision_agent(
        args.out,
        broker=device_broker(args.out, args.broker_identity, args.broker_host, args.broker_port),
        rpc=rpc,
        contract=contract,
        task=args.task or NO_TASK,
        name=args.name,
        sensors={"hardware": args.hardware},
    )
    print(device.address)  # alone on stdout, for scripts: ADDRESS=$(truscl agent provision ...)
    missing = [
        text
        for text, absent in (
            ("--task", args.task is None),
            ("--contract or --deployment", contract == NO_CONTRACT),
            ("--broker-identity", args.broker_identity is None),
        )
        if absent
    ]
    print(f"wrote {device.config} (key {device.key}, mode 0600)", file=sys.stderr)
    print(f"register the device: truscl chain register {device.address} ...", file=sys.stderr)
    if missing:
        print(
            f"still to give (run provision again; the key stays): {', '.join(missing)}",
            file=sys.stderr,
        )
    return 0


def run(args: argparse.Namespace) -> int:
    from truscl.agent.config import AgentConfig
    from truscl.agent.service import run_agents

    configs = [AgentConfig.load(path) for path in args.config]
    run_agents(configs, stop_on_signals())
    return 0


def show_status(args: argparse.Namespace) -> int:
    from truscl.agent.config import AgentConfig
    from truscl.agent.status import agent_status, describe

    status = agent_status(AgentConfig.load(args.config))
    print(describe(status))
    if args.json:
        args.json.write_text(json.dumps(status, indent=2) + "\n")
    return 0
