"""``truscl audit``: check a task's archived rounds against the chain; needs no key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from truscl.cli.common import task_id
from truscl.errors import ConfigError

if TYPE_CHECKING:
    from truscl.chain import ChainClient
    from truscl.server.archive import Archive


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", help="check a task's archived rounds against the chain (JSON-RPC node)"
    )
    audit.add_argument("--rpc", required=True, help="JSON-RPC URL of the chain")
    audit.add_argument("--contract", required=True, help="address of the truscl contract")
    audit.add_argument("--task", required=True, type=task_id, help="0x-prefixed task id")
    audit.add_argument("--archive", type=Path, required=True, help="the aggregator's archive")
    audit.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")
    audit.add_argument(
        "--keygen", type=Path, metavar="FILE",
        help="also check a threshold task's key: a key holder's keygen.cbor against the chain "
        "and the archived spec",
    )  # fmt: skip
    audit.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from truscl.chain import ChainClient
    from truscl.chain.rpc import connect
    from truscl.hashing import keccak
    from truscl.progress import Progress
    from truscl.server.archive import Archive
    from truscl.server.audit import audit_task

    if not (args.archive / "blobs").is_dir():
        raise ConfigError(f"{args.archive} is not an aggregator archive")
    chain = ChainClient.at(connect(args.rpc), args.contract)
    extra: frozenset[str] = frozenset()
    if args.keygen is not None and args.keygen.is_file():  # a key holder's copy: named
        extra = frozenset({keccak(args.keygen.read_bytes()).hex()})
    with Progress("audit", 0) as progress:  # the count of rounds comes with the first
        report = audit_task(
            chain,
            Archive(args.archive),
            args.task,
            extra,
            on_round=lambda done, total: progress.advance(f"round {done}", total),
        )
    for problem in report.problems:
        print(f"task: FAILED: {problem}")
    for item in report.rounds:
        status = "verified" if item.verified else "FAILED: " + "; ".join(item.problems)
        print(f"round {item.round:3d}  {item.updates:3d} updates  {status}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"audit: {report.verified}/{report.total} rounds verified")
    if args.json:
        try:
            args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {args.json}: {exc.strerror}") from None
    keygen_ok = args.keygen is None or _audit_keygen(args, chain, Archive(args.archive))
    return 0 if report.ok and keygen_ok else 1


def _audit_keygen(args: argparse.Namespace, chain: ChainClient, archive: Archive) -> bool:
    from truscl.errors import TrusclError
    from truscl.server.keygen import KeygenRecord, audit_keygen
    from truscl.task import TaskSpec
    from truscl.wire.signing import Domain

    try:
        record = KeygenRecord.decode(args.keygen.read_bytes())
        spec = TaskSpec.decode(archive.spec(args.task))
        task = chain.task(bytes.fromhex(args.task[2:]))
        audit_keygen(record, spec, task, Domain(chain.chain_id, chain.address))
    except OSError as exc:
        print(f"keygen: FAILED: cannot read {args.keygen}: {exc.strerror}")
        return False
    except TrusclError as exc:
        print(f"keygen: FAILED: {exc}")
        return False
    holders = ", ".join(name for name, _ in record.terms.holders)
    print(f"keygen: verified, the task's key was made by {holders}, each signing the transcript")
    return True
