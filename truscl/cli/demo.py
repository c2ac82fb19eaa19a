"""``truscl demo``: the whole deployment started on one machine."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from truscl.cli.common import log_format_option
from truscl.errors import ConfigError


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help="use this development node (with an unlocked, funded first account) instead of "
        "starting anvil; with --workdir, `truscl audit` can check the run afterwards",
    )
    demo.add_argument(
        "--in-process",
        action="store_true",
        help="run every role as a thread of this process, on the in-process EVM "
        "(or on --rpc), instead of one process per role",
    )
    demo.add_argument(
        "--round-seconds",
        type=float,
        help="round deadline: after it a round closes with a quorum (default 20, and 0.8 s "
        "a device beyond 25; a round closes as soon as every device is in)",
    )
    demo.add_argument(
        "--he-mode",
        choices=("threshold", "single-key"),
        default="threshold",
        help="threshold (default): the owner and a key guardian share the CKKS key, both "
        "needed to decrypt; single-key: the owner holds it all",
    )
    demo.add_argument(
        "--task",
        type=Path,
        metavar="FILE",
        help="learn what this task file (TOML, as deploy/task.toml) names: features, label, "
        "model, ranges, window, min_readings, DP terms; rounds, quorum, deadline and message "
        "size stay the demo's options",
    )
    demo.add_argument(
        "--drop-device",
        type=int,
        metavar="ROUND",
        help="stop the last device before this round, to show a round closing at quorum",
    )
    log_format_option(demo)
    demo.add_argument(
        "--data",
        type=Path,
        metavar="FILE.csv",
        help="replay this recorded trace through the devices' drivers instead of simulated "
        "rooms, split across the devices (docs/traces.md)",
    )
    demo.add_argument(
        "--split-by",
        choices=("day", "device-column"),
        default="day",
        help="with --data: deal calendar days round-robin to --devices devices (default), or "
        "one device per value of the map's device column (--devices is then that count)",
    )
    demo.add_argument(
        "--test",
        type=Path,
        metavar="FILE.csv",
        help="with --data: evaluate on this held-out trace (default: hold out the last day)",
    )
    demo.add_argument(
        "--map",
        type=Path,
        metavar="FILE.toml",
        help="with --data: the column map of --data and --test (default: the .toml file "
        "beside --data, same name)",
    )
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from truscl.demo import DemoConfig, run_demo

    if args.data is None and (args.test or args.map or args.split_by != "day"):
        raise ConfigError("--split-by, --test and --map go with --data")

    # SIGTERM unwinds like Ctrl-C, so the demo stops what it started (the services, the broker,
    # anvil) instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    config = DemoConfig(
        devices=args.devices,
        rounds=args.rounds,
        seed=args.seed,
        max_message=args.max_message,
        workdir=args.workdir,
        drop_device_at=args.drop_device,
        round_seconds=args.round_seconds,
        rpc=args.rpc,
        in_process=args.in_process,
        he_mode=args.he_mode,
        log_format=getattr(args, "log_format", "text"),
        task_file=args.task,
        data=args.data,
        split_by=args.split_by,
        test=args.test,
        trace_map=args.map,
    )
    summary = run_demo(config, out=sys.stdout)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["audit"]["verified"] == summary["audit"]["total"]
    return 0 if ok else 1
