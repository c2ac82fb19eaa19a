"""Round latency and gas per round by device count, from the real deployment ``truscl demo`` runs.

Each count runs :func:`truscl.demo.run_demo` in its default (fleet) mode: every role its own
``truscl`` process (owner, key guardian, aggregator, broker with TLS and ACL, anvil), devices
in ``truscl agent run`` processes, each its own up to 8 devices and beyond that sharing 8
processes evenly (``truscl.demo.fleet.DEVICE_PROCESSES``), so 100 devices are 8 processes of
12-13. The demo starts this benchmark's own anvil (``--rpc``), so that after the run the chain is
still there to read:

- ``round_latency_s``: median over rounds 2.. of the time from one model's release to the next
  (round 1 also waits for every device to start). Devices sense in accelerated time (a round's
  worth of readings in 3 s of real time, ``truscl.demo.fleet.ROUND_SECONDS_REAL``, slower
  beyond 26 devices so that their simulated sensors take at most a quarter of a core,
  ``truscl.demo.fleet.read_period``); each starts with a full window, so a round waits for
  readings only where a device has invalid ones. The demo evaluates on the held-out week of
  at most 20 rooms (``truscl.demo.common.evaluation_rooms``), so its launch does not grow by
  a second a device.
- ``round_participants``: the updates each round counted (``round_participants_min``: the
  fewest of any round), so that a latency is never read without how many devices made it.
- ``gas_per_round``: gas the chain charged per round, from the receipts of every transaction
  sent to the contract after the task was created (the aggregator's ``anchorRound``, the owner's
  ``publishModel``), divided by the rounds; by method in ``gas_per_round_by_method``. One anchor
  per round whatever the cohort: the figure should not grow with the device count.

Each count runs in a child process (its own process group) with a time limit; a count that
fails or runs out of time (a round that never closes, the machine's limits) is reported under
``round_latency_not_run`` with the reason and the demo's last lines (how far it got), and the
counts above it are not tried.

    .venv/bin/python -m bench.round_latency [--quick] [--devices 10 100 1000] [--limit-s S]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

COUNTS = (10, 100, 1000)
QUICK_COUNTS = (10,)
ROUNDS, QUICK_ROUNDS = 4, 3
LIMIT_S = 2400.0  # per device count: past this the count is reported as not finished
ROOT = Path(__file__).resolve().parents[1]


def figures(
    quick: bool, counts: tuple[int, ...] | None = None, limit_s: float = LIMIT_S
) -> dict[str, Any]:
    counts = counts or (QUICK_COUNTS if quick else COUNTS)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    latency: dict[str, float] = {}
    gas: dict[str, float] = {}
    by_method: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    participants: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    for devices in counts:
        started = time.monotonic()
        key = str(devices)
        run, why = _child(devices, rounds, limit_s)
        wall[key] = round(time.monotonic() - started, 1)
        if run is None:  # the limit this machine reached: say which, stop scaling
            failed[key] = why
            break
        latency[key], gas[key] = run["latency_s"], run["gas_per_round"]
        by_method[key] = run["gas_by_method"]
        participants[key] = run["participants"]
    return {
        "round_latency_s": latency,
        "gas_per_round": gas,
        "gas_per_round_by_method": by_method,
        "round_latency_run_s": wall,
        "round_participants": participants,  # updates counted in each round, by device count
        "round_participants_min": {key: min(counted) for key, counted in participants.items()},
        "round_latency_not_run": failed,
        "round_latency_method": (
            f"truscl demo (fleet: every role its own process, devices {_sharing()}), "
            f"{rounds} rounds per count, threshold HE, anvil; latency = median of rounds 2.., "
            "model release to model release (devices sense a round's readings in 3 s, "
            "beyond 26 devices slower: truscl.demo.fleet.read_period)"
        ),
    }


def _sharing() -> str:
    from truscl.demo.fleet import DEVICE_PROCESSES

    return f"alone up to {DEVICE_PROCESSES} processes, then sharing {DEVICE_PROCESSES} processes"


def _child(devices: int, rounds: int, limit_s: float) -> tuple[dict[str, Any] | None, str]:
    """One count in a child process group: its figures, or None and why not."""
    command = [sys.executable, "-m", "bench.round_latency", "--one", str(devices)]
    with tempfile.TemporaryFile("w+") as progress:
        child = subprocess.Popen(
            [*command, "--rounds", str(rounds)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=progress, text=True, start_new_session=True,
        )  # fmt: skip
        timed_out = False
        try:
            stdout, _ = child.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(child.pid, signal.SIGTERM)  # the demo and every process it started
            try:
                child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
            # A starved device process can outlive the demo that was stopping it (seen with
            # 1,000 devices): nothing of this count may load the next one or the machine.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            stdout = ""
        progress.seek(0)
        tail = " | ".join(progress.read().strip().splitlines()[-4:])
    if child.returncode == 0 and stdout.strip():
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        return result, ""
    reason = f"not finished within {limit_s:.0f} s" if timed_out else "failed"
    return None, f"{reason} (exit {child.returncode}); last output: {tail}"[:1500]


def _run(devices: int, rounds: int) -> dict[str, Any]:
    from truscl.chain.anvil import Anvil
    from truscl.demo import DemoConfig, run_demo

    with (
        tempfile.TemporaryDirectory(prefix=f"truscl-bench-{devices}-") as folder,
        Anvil(log=Path(folder) / "anvil.log") as node,
    ):
        summary = run_demo(
            DemoConfig(devices=devices, rounds=rounds, rpc=node.url, workdir=Path(folder) / "demo"),
            out=sys.stderr,  # the parent keeps its last lines: how far a failed run got
        )
        per_round = [row["seconds"] for row in summary["rounds"]]
        if len(per_round) != rounds:
            raise RuntimeError(f"{len(per_round)} of {rounds} rounds closed")
        by_method = _gas_by_method(node.url, summary["contract"], summary["task"])
    per_round_gas = {name: total / rounds for name, total in by_method.items()}
    return {
        "latency_s": statistics.median(per_round[1:] if rounds > 1 else per_round),
        "gas_per_round": sum(per_round_gas.values()),
        "gas_by_method": per_round_gas,
        "participants": [row["participants"] for row in summary["rounds"]],
    }


def _gas_by_method(rpc: str, contract: str, task: str) -> dict[str, float]:
    """Gas of every transaction to ``contract`` after ``task`` was created, by method."""
    from eth_utils import keccak

    from truscl.chain import NodeChain
    from truscl.contracts import load_artifact

    w3 = NodeChain(rpc).web3()
    abi = load_artifact("Truscl")["abi"]
    names = {
        keccak(text=f"{f['name']}({','.join(i['type'] for i in f['inputs'])})")[:4]: f["name"]
        for f in abi
        if f["type"] == "function" and all(not i["type"].startswith("tuple") for i in f["inputs"])
    }
    gas: dict[str, float] = defaultdict(float)
    task_created = False
    for number in range(w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if isinstance(tx, bytes) or tx.get("to") != contract:
                continue
            name = names.get(bytes(tx["input"][:4]), "other")
            if name == "createTask":
                task_created = True  # the rounds' transactions come after it
                continue
            if task_created:
                gas[name] += w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"]
    if not task_created:
        raise RuntimeError(f"no createTask for {task} on the chain")
    return dict(gas)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 devices only (CI)")
    parser.add_argument("--devices", type=int, nargs="+", help=f"counts (default {COUNTS})")
    parser.add_argument("--limit-s", type=float, default=LIMIT_S, help="per count, seconds")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one count
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_run(args.one, args.rounds)))
        return 0
    from bench.__main__ import report

    counts = tuple(args.devices) if args.devices else None
    return report({"round_latency": figures(args.quick, counts, args.limit_s)}, args.json)


if __name__ == "__main__":
    sys.exit(main())
