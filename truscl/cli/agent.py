"""``truscl agent``: the device agent (systemd/truscl-agent.service runs ``agent run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from truscl.cli.common import stop_on_signals


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = commands.add_parser("agent", help="the device agent: provision, run, status")
    actions = agent.add_subparsers(dest="action", required=True, metavar="ACTION")
    run_parser = actions.add_parser("run", help="run the agent as a service")
    run_parser.add_argument("--config", type=Path, required=True, help="the agent's TOML file")
    run_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from truscl.agent.config import AgentConfig
    from truscl.agent.service import run_agent

    config = AgentConfig.load(args.config)
    run_agent(config, stop_on_signals())
    return 0
