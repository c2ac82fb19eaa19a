"""``truscl chain``: deploy the contract, admit devices, and see what the chain holds.

``deploy`` writes a deployment record that the other commands (and the other roles) take with
``--deployment FILE``; ``--rpc URL --contract ADDRESS`` names the same thing by hand. ``status``
needs no key: it is what an auditor runs with nothing but an address.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from truscl.cli.common import address
from truscl.errors import ChainError, ConfigError

if TYPE_CHECKING:
    from web3 import Web3

    from truscl.chain.deployment import Deployment


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chain = commands.add_parser(
        "chain", help="deploy the contract, register devices, show what the chain holds"
    )
    actions = chain.add_subparsers(dest="action", required=True, metavar="ACTION")

    deploy = actions.add_parser(
        "deploy",
        help="deploy the Truscl contract and write its deployment record",
        usage="truscl chain deploy --rpc URL --key FILE --out FILE",
    )
    deploy.add_argument("--rpc", required=True, metavar="URL", help="JSON-RPC URL of the chain")
    deploy.add_argument(
        "--key", type=Path, required=True, metavar="FILE",
        help="the admin's key file (mode 0600; 32 raw bytes or 64 hex digits); pays the gas",
    )  # fmt: skip
    deploy.add_argument(
        "--out", type=Path, required=True, metavar="FILE",
        help="where to write the deployment record (JSON; never overwritten)",
    )  # fmt: skip
    deploy.set_defaults(handler=run_deploy)

    enrol = actions.add_parser(
        "register",
        help="admit devices into the contract's registry",
        usage="truscl chain register ADDRESS... "
        "(--deployment FILE | --rpc URL --contract ADDRESS) --key FILE",
    )
    enrol.add_argument("devices", nargs="+", type=address, metavar="ADDRESS")
    _target_arguments(enrol)
    enrol.add_argument(
        "--key", type=Path, required=True, metavar="FILE",
        help="a registrar's key file (the deployer's admin key is one)",
    )  # fmt: skip
    enrol.set_defaults(handler=run_register)

    status = actions.add_parser(
        "status",
        help="what the chain holds: deployment block, code, devices, tasks (no key)",
        usage="truscl chain status (--deployment FILE | --rpc URL --contract ADDRESS) "
        "[--json FILE]",
    )
    _target_arguments(status)
    status.add_argument("--json", type=Path, metavar="FILE", help="also write the status here")
    status.set_defaults(handler=run_status)

    whose = actions.add_parser(
        "address",
        help="the address of a key file (to fund it, or to name a role in a config)",
        usage="truscl chain address --key FILE",
    )
    whose.add_argument("--key", type=Path, required=True, metavar="FILE", help="a key file")
    whose.set_defaults(handler=run_address)


def run_address(args: argparse.Namespace) -> int:
    from truscl.keyfile import load_account

    print(load_account(args.key).address)
    return 0


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--deployment", type=Path, metavar="FILE",
        help="a deployment record (from `truscl chain deploy`): gives the URL and the address",
    )  # fmt: skip
    parser.add_argument(
        "--rpc", metavar="URL",
        help="JSON-RPC URL of the chain (with --deployment: instead of the record's)",
    )  # fmt: skip
    parser.add_argument(
        "--contract", type=address, metavar="ADDRESS", help="the contract (without --deployment)"
    )


def _target(args: argparse.Namespace) -> tuple[str, str, Deployment | None]:
    """RPC URL, contract address and the record they came from, if any."""
    from truscl.chain.deployment import Deployment

    if args.deployment is not None:
        if args.contract is not None:
            raise ConfigError("give --deployment FILE or --contract ADDRESS, not both")
        record = Deployment.load(args.deployment)
        url = args.rpc or record.rpc_url
        if url is None:
            raise ConfigError(
                f"{args.deployment} names no RPC URL (in-process EVM); give --rpc URL"
            )
        return url, record.address, record
    if args.rpc is None or args.contract is None:
        raise ConfigError("give --deployment FILE, or both --rpc URL and --contract ADDRESS")
    return args.rpc, args.contract, None


def _check_contract(w3: Web3, contract: str, record: Deployment | None) -> None:
    """Refuse to send transactions anywhere but to this truscl's contract."""
    from truscl.chain.deployment import artifact_code_hash, code_hash

    if record is not None:
        record.verify(w3)
        return
    found = code_hash(w3, contract)
    if found is None:
        raise ChainError(f"no contract at {contract} on chain {w3.eth.chain_id}")
    if found != artifact_code_hash():
        raise ChainError(f"the code at {contract} is not this truscl's Truscl contract")


def run_deploy(args: argparse.Namespace) -> int:
    from truscl.chain.deployment import deploy
    from truscl.chain.rpc import connect, rpc_errors
    from truscl.keyfile import load_account

    out: Path = args.out
    if out.exists():  # checked before any gas is spent, and again when written
        raise ConfigError(f"deployment record {out} already exists; choose another file")
    account = load_account(args.key)
    w3 = connect(args.rpc)
    with rpc_errors(args.rpc):
        record = deploy(w3, account, rpc_url=args.rpc)
    print(f"address   {record.address}")
    print(f"chain id  {record.chain_id}")
    print(f"block     {record.deployment_block}")
    print(f"tx        {record.tx_hash}")
    try:
        record.save(out)
    except ConfigError as exc:
        raise ConfigError(f"contract deployed at {record.address}, but {exc}") from None
    print(f"record    {out}")
    return 0


def run_register(args: argparse.Namespace) -> int:
    from truscl.chain import ChainClient
    from truscl.chain.rpc import connect, rpc_errors
    from truscl.keyfile import load_account

    url, contract, record = _target(args)
    account = load_account(args.key)
    w3 = connect(url)
    registered = skipped = failed = 0
    with rpc_errors(url):
        _check_contract(w3, contract, record)
        client = ChainClient.at(w3, contract, account)
        if not client.is_registrar(account.address):
            raise ChainError(f"{account.address} is not a registrar of {client.address}")
        if w3.eth.get_balance(account.address) == 0:
            raise ChainError(f"{account.address} has no funds to pay for gas on this chain")
        todo = []
        for device in dict.fromkeys(w3.to_checksum_address(d) for d in args.devices):
            if client.is_device(device):
                print(f"{device}  already registered, skipped")
                skipped += 1
            else:
                todo.append(device)
        # sent together, then awaited: a block or two for the lot on a public chain
        for device, outcome in zip(todo, client.register_devices(todo), strict=True):
            if isinstance(outcome, str):
                print(f"{device}  registered (tx {outcome})")
                registered += 1
            elif "DeviceAlreadyRegistered" in str(outcome):  # registered meanwhile by another
                print(f"{device}  already registered, skipped")
                skipped += 1
            else:
                print(f"{device}  FAILED: {outcome}", file=sys.stderr)
                failed += 1
    print(f"registered {registered}, already registered {skipped}, failed {failed}")
    return 1 if failed else 0


def run_status(args: argparse.Namespace) -> int:
    from truscl.chain.deployment import status
    from truscl.chain.rpc import connect, rpc_errors

    url, contract, record = _target(args)
    w3 = connect(url)
    with rpc_errors(url):
        found = status(w3, contract, rpc_url=url)
        problems = record.problems(w3) if record is not None else []
    print(f"chain id          {found.chain_id}")
    print(f"contract          {found.contract}")
    code = "matches this truscl's artifact" if found.code_matches else "DIFFERS from this truscl's"
    print(f"code              {code} (keccak {found.code_hash})")
    if found.deployment_block is not None:
        print(f"deployment block  {found.deployment_block} (read from the contract)")
        print(f"devices           {found.devices} registered")
        print(f"tasks             {len(found.tasks)}")
        for task in found.tasks:
            print(
                f"  {task.task}  rounds {task.rounds_anchored}/{task.rounds} anchored"
                f"  owner {task.owner}  aggregator {task.aggregator}"
            )
    if record is not None:
        print("record            " + ("matches the chain" if not problems else "MISMATCH"))
        for problem in problems:
            print(f"  {problem}")
    if args.json:
        report: dict[str, Any] = found.as_dict()
        if record is not None:
            report["record_problems"] = problems
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if found.code_matches and not problems else 1
