"""``truscl broker``: provision a deployment's mosquitto (TLS, logins, ACL)."""

from __future__ import annotations

import argparse
from pathlib import Path

from truscl.cli.common import address, task_id


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = commands.add_parser("broker", help="the MQTT broker: provision")
    actions = broker.add_subparsers(dest="action", required=True, metavar="ACTION")
    provision = actions.add_parser(
        "provision",
        help="write a CA, certificates, logins, an ACL and mosquitto.conf for a fleet",
        description=(
            "Write (or extend: the CA and the identities already issued are kept) a broker "
            "folder: one client folder each for the devices, the aggregator, the owner and the "
            "key guardians."
        ),
    )
    provision.add_argument("--out", type=Path, required=True, help="the broker's folder")
    provision.add_argument(
        "--devices", type=address, nargs="+", required=True, metavar="ADDRESS",
        help="the devices' Ethereum addresses",
    )  # fmt: skip
    provision.add_argument(
        "--host", action="append", dest="hosts", metavar="NAME",
        help="a name or IP clients use for the broker (repeat; the first goes into the clients' "
        "broker.toml; default: 127.0.0.1 and localhost)",
    )  # fmt: skip
    provision.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    provision.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    provision.add_argument("--task", type=task_id, help="allow only this task's topics")
    provision.add_argument(
        "--guardians", type=int, default=1, metavar="N",
        help="key guardians guardian-1 .. guardian-N (default 1; threshold mode needs one or "
        "more, 0 for a single-key owner)",
    )  # fmt: skip
    provision.add_argument(
        "--aggregator-workers", type=int, default=1, metavar="N",
        help="logins for an aggregator of N processes (its `workers`): aggregator-1 .. "
        "aggregator-(N-1), their passwords beside the aggregator's (default 1)",
    )  # fmt: skip
    provision.set_defaults(handler=run_provision)


def run_provision(args: argparse.Namespace) -> int:
    from truscl.broker.provision import provision_broker

    done = provision_broker(
        args.out,
        args.devices,
        hosts=tuple(args.hosts or ("127.0.0.1", "localhost")),
        port=args.port,
        bind=args.bind,
        task=args.task,
        guardians=args.guardians,
        aggregator_workers=args.aggregator_workers,
    )
    print(f"configuration: {done.conf}")
    print(f"ACL: {done.acl}")
    print(f"broker log: {done.log}")
    for name in done.identities:
        state = "new" if name in done.added else "kept"
        print(f"identity {name} ({state}): {done.client_dir(name)}/broker.toml")
    if done.aggregator_workers > 1:
        print(f"aggregator logins: {done.aggregator_workers} (aggregator, aggregator-1 ...)")
    print(f"start the broker with: mosquitto -c {done.conf}")
    print(
        "copy each clients/NAME folder to its machine (it holds that identity's key and password)"
    )
    return 0
