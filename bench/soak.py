"""A soak: a large simulated fleet for many rounds, one fault of each kind injected on the way,
and an account of every update a device built: counted once, or lost.

Every role is a real ``truscl`` process (tests/harness.py's ``Fleet``: a persistent mosquitto,
an anvil, threshold mode with one key guardian); the devices share a few processes (``truscl
agent run --config … --config …``), as the demo hosts a large fleet. The aggregator reaches the
node through a ``TcpGate``, so the node can be taken from it alone. Each round needs every
device (``expected_devices``, a deadline an hour away), so a lost update would stall a round
rather than pass unseen, and the accounting below would still name it.

Faults, each at a round drawn up front (``--seed`` shuffles which kind goes where), from round 2:

- ``aggregator-kill``: ``kill -9`` of the aggregator with the round part-counted, then a restart;
- ``aggregator-down``: the aggregator stopped (SIGTERM) while every device publishes its update
  to the broker, then started;
- ``broker-restart``: mosquitto stopped and started with the round part-counted;
- ``chain-gate``: the node unreachable for the aggregator while the round fills and closes, until
  its anchoring has failed at least once;
- ``owner-restart``: the owner stopped while the round is open, the round anchored, then the
  owner started;
- ``device-kill``: a device process ``kill -9``-ed while its devices have sent and hold no
  receipt (the aggregator frozen meanwhile), then restarted;
- ``forged-receipts``: "accepted" receipts for the pending updates of a device process, signed
  by a stranger's key and published on the devices' receipt topics by a stranger client.

A client-id takeover is not injected: the harness's broker is anonymous, where a takeover
succeeds by design (any client may claim any id), so it would test a broker truscl does not
deploy; on the provisioned broker it fails (``use_username_as_clientid``), which
tests/test_broker_acl.py checks. Running the soak on the provisioned broker instead would shut
out the forged-receipts fault: its ACL lets nobody but the aggregator publish on a receipt topic,
so a forgery would never reach the device's signature check.

For the faults that must land while a round is open, one device process is held (SIGSTOP) once
its devices have sent for the round before, so the round cannot close before the fault: the
soak waits on state files and logs, never on the clock.

Figures: ``sent`` (updates the devices built, from their state files), ``accepted`` (the updates
the chain's anchors count, checked against the archive's manifests), ``lost`` (built for an
anchored round, counted nowhere), ``double_counted`` (a (device, round made for) counted twice),
round close times (round open to anchor, from the aggregator's log) against the rounds without a
fault as the baseline, and the aggregator's RSS sampled over time.

    .venv/bin/python bench/soak.py [--quick] [--devices 200] [--processes 8] [--rounds 20]
        [--json FILE] [--workdir DIR] [--seed N]

Exit status 1 if an update was lost or counted twice, a fault was not injected, or the audit
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Fleet, TcpGate  # noqa: E402
from truscl.agent.rounds import HAS_UPDATE, Phase  # noqa: E402
from truscl.chain.anvil import Anvil  # noqa: E402
from truscl.mqtt import MqttLink  # noqa: E402
from truscl.progress import Progress  # noqa: E402
from truscl.wire import Domain, TaskTopics, Update  # noqa: E402
from truscl.wire.receipt import Receipt  # noqa: E402

KINDS = (
    "aggregator-kill",
    "aggregator-down",
    "broker-restart",
    "chain-gate",
    "owner-restart",
    "device-kill",
    "forged-receipts",
)
NOT_INJECTED = {
    "client-id-takeover": (
        "the soak's broker is anonymous, where a takeover succeeds by design; the provisioned "
        "broker refuses it (use_username_as_clientid): tests/test_broker_acl.py::"
        "test_another_identitys_client_id_does_not_take_over_its_session"
    )
}
# Faults that must land while their round is open: a device process is held from the round before.
HOLD = {
    "aggregator-kill": 0,
    "broker-restart": 0,
    "chain-gate": 0,
    "forged-receipts": 1,
    "owner-restart": 0,
}
HOLD_PAUSED = {"device-kill": 2}  # held likewise, released while the aggregator is frozen
SETTLED = (*HAS_UPDATE[1:], Phase.SKIPPED, Phase.ABANDONED)  # sent (or given up), not just built
# answered by the aggregator (or given up): "sent" is the device's word that it handed the update
# to its MQTT client, whose bytes a process frozen at once may not have written yet
ANSWERED = (Phase.ACCEPTED, Phase.REJECTED, Phase.INCLUDED, Phase.SKIPPED, Phase.ABANDONED)
WAIT_S = 900.0  # the longest any one step may take before the soak calls it stuck
WAIT_QUICK_S = 240.0  # in --quick, so that a stuck run still reports within the test's timeout
RSS_EVERY_S = 1.0
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Fault:
    kind: str
    round: int
    injected: bool = False
    recovered: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)


class Soak:
    """The fleet, its device processes, the gate and the fault schedule of one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path, rpc: str) -> None:
        self.args = args
        self.gate = TcpGate(int(rpc.rsplit(":", 1)[1])).up()
        self.rpc = rpc
        # batch 4 of a window of 128: a sampling rate whose privacy budget lasts 60 rounds
        terms = {
            "rounds": args.rounds,
            "quorum": args.devices,
            "round_seconds": 3600.0,
            "batch_size": 4,
        }
        # A reading a second: the window is there from the start (the sensors' history), so
        # faster simulated sensing buys nothing, and at the harness's default (one reading
        # every 5 ms) 200 devices spend most of two cores reading their fake buses.
        self.fleet = Fleet(workdir, rpc, devices=args.devices, terms=terms, time_scale=300.0)
        names = [f"device-{i}" for i in range(args.devices)]
        self.groups = {
            f"devices-{g}": names[g :: args.processes] for g in range(args.processes)
        }  # fmt: skip
        kinds = list(KINDS)
        if args.seed is not None:
            random.Random(args.seed).shuffle(kinds)
        span = args.rounds - 2
        at = [2 + round(i * span / (len(kinds) - 1)) for i in range(len(kinds))]
        self.schedule = {r: Fault(kind, r) for r, kind in zip(at, kinds, strict=True)}
        self.rss: list[tuple[float, float]] = []
        self.rss_by_round: list[dict[str, Any]] = []  # at each release: warm, steady state
        self.started = time.monotonic()
        self._sampling = True

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        fleet = self.fleet
        fleet.start(hold=("aggregator", *(f"device-{i}" for i in range(self.args.devices))))
        config = fleet.config("aggregator")
        config.write_text(config.read_text().replace(self.rpc, self.gate.url))
        fleet.run("aggregator")
        for group, names in self.groups.items():
            fleet.run_devices(group, names)
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def run(self) -> None:
        with Progress("soak", self.args.rounds, plain=False) as progress:  # a bar on a terminal
            for round_no in range(1, self.args.rounds + 1):
                began = time.monotonic()
                fault = self.schedule.get(round_no)
                if fault is not None:
                    self.inject(fault)
                following = self.schedule.get(round_no + 1)
                if following is not None and following.kind in HOLD | HOLD_PAUSED:
                    self.hold(following, round_no)
                self.wait(partial(self.fleet.model_released, round_no), f"model {round_no}")
                if fault is not None:
                    fault.recovered = True
                self.rss_by_round.append(self._rss_now(round_no))
                progress.print(
                    f"round {round_no:3d} released after {time.monotonic() - began:6.1f} s"
                    + (f"  [{fault.kind}]" if fault else ""),
                    sys.stdout,
                )
                progress.advance(f"round {round_no}")

    def close(self) -> None:
        self._sampling = False
        self.fleet.close()
        self.gate.down()

    def _rss_now(self, round_no: int) -> dict[str, Any]:
        process = self.fleet.processes.get("aggregator")
        pid = None if process is None else process.pid
        return {"round": round_no, "pid": pid, "mb": None if pid is None else _rss_mb(pid)}

    def _sample_rss(self) -> None:
        """The aggregator's VmRSS every second, from whichever process is the aggregator now
        (the faults restart it)."""
        while self._sampling:
            process = self.fleet.processes.get("aggregator")
            if process is not None:
                mb = _rss_mb(process.pid)
                if mb is not None:
                    self.rss.append((time.monotonic() - self.started, mb))
            time.sleep(RSS_EVERY_S)

    # --- waiting ---------------------------------------------------------------------------

    def wait(self, condition: Callable[[], bool], what: str, seconds: float = 0.0) -> None:
        seconds = seconds or (WAIT_QUICK_S if self.args.quick else WAIT_S)
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise SoakFailed(f"{what} did not happen within {seconds:.0f}s\n{self.tails()}")
            time.sleep(0.2)

    def tails(self, lines: int = 10) -> str:
        names = ["aggregator", "owner", "guardian-1", *self.groups]
        return "\n".join(
            f"--- {name}\n" + "\n".join(self.fleet.log(name).splitlines()[-lines:])
            for name in names
        )

    def aggregator_says(self, text: str) -> int:
        return self.fleet.log("aggregator").count(text)

    def phases(self, names: list[str], round_no: int) -> list[Phase | None]:
        found = []
        for name in names:
            rounds, _ = self.fleet.device_state(name)
            found.append(next((s.phase for s in rounds if s.round == round_no), None))
        return found

    def all_sent(self, names: list[str], round_no: int) -> bool:
        return all(phase in SETTLED for phase in self.phases(names, round_no))

    # --- faults ----------------------------------------------------------------------------

    def group_for(self, fault: Fault) -> str:
        index = {**HOLD, **HOLD_PAUSED}[fault.kind] % len(self.groups)
        return list(self.groups)[index]

    def hold(self, fault: Fault, round_no: int) -> None:
        """Freeze a device process once its devices have sent for ``round_no``, so that round
        ``round_no + 1`` cannot close before ``fault`` is injected in it."""
        group = self.group_for(fault)
        names = self.groups[group]
        self.wait(
            lambda: all(p in ANSWERED for p in self.phases(names, round_no)),
            f"{group}'s updates for round {round_no} answered",
        )
        self.fleet.pause(group)
        early = [p for p in self.phases(names, round_no + 1) if p in HAS_UPDATE]
        fault.evidence["held"] = group
        fault.evidence["held_built_early"] = len(early)  # 0: the hold did keep the round open

    def inject(self, fault: Fault) -> None:
        print(f"round {fault.round:3d}: injecting {fault.kind}", flush=True)
        getattr(self, "_" + fault.kind.replace("-", "_"))(fault)
        fault.injected = True

    def _aggregator_kill(self, fault: Fault) -> None:
        r, fleet = fault.round, self.fleet
        self.wait(lambda: self.aggregator_says(f"round {r} accepted") >= 1, f"round {r} counting")
        fleet.kill("aggregator")
        fault.evidence["accepted_before_kill"] = self.aggregator_says(f"round {r} accepted")
        fleet.run("aggregator")
        fleet.resume(fault.evidence["held"])
        self.wait(
            lambda: (
                self.aggregator_says(f"round {r} resumed with")
                + self.aggregator_says(f"round {r} closed before a restart")
                >= 1
            ),
            f"round {r} taken up after the restart",
        )
        fault.evidence["resumed_open"] = self.aggregator_says(f"round {r} resumed with") == 1

    def _aggregator_down(self, fault: Fault) -> None:
        r, fleet = fault.round, self.fleet
        self.wait(lambda: self.aggregator_says(f"round {r} open") >= 1, f"round {r} open")
        fault.evidence["stop_exit_code"] = fleet.stop("aggregator")
        devices = [name for names in self.groups.values() for name in names]
        self.wait(lambda: self.all_sent(devices, r), f"every device sent for round {r}")
        fault.evidence["sent_while_down"] = sum(p == Phase.SENT for p in self.phases(devices, r))
        fleet.run("aggregator")

    def _broker_restart(self, fault: Fault) -> None:
        r, fleet = fault.round, self.fleet
        self.wait(lambda: self.aggregator_says(f"round {r} accepted") >= 1, f"round {r} counting")
        fleet.broker.stop()
        fault.evidence["accepted_before_restart"] = self.aggregator_says(f"round {r} accepted")
        fault.evidence["broker_persisted"] = (fleet.broker.workdir / "mosquitto.db").exists()
        fleet.broker.start()
        fleet.resume(fault.evidence["held"])

    def _chain_gate(self, fault: Fault) -> None:
        r, fleet = fault.round, self.fleet
        self.wait(lambda: self.aggregator_says(f"round {r} accepted") >= 1, f"round {r} counting")
        self.gate.down()
        fleet.resume(fault.evidence["held"])
        try:
            self.wait(
                lambda: self.aggregator_says(f"round {r} not finished yet") >= 1,
                f"round {r}'s anchoring failing while the node is away",
            )
            fault.evidence["anchored_while_away"] = fleet.model_released(r)
        finally:
            self.gate.up()

    def _owner_restart(self, fault: Fault) -> None:
        r, fleet = fault.round, self.fleet
        self.wait(lambda: self.aggregator_says(f"round {r} open") >= 1, f"round {r} open")
        fault.evidence["stop_exit_code"] = fleet.stop("owner")
        fleet.resume(fault.evidence["held"])  # only now may the round close
        self.wait(lambda: self.aggregator_says(f"round {r} anchored") >= 1, f"round {r} anchored")
        fault.evidence["released_while_down"] = fleet.model_released(r)
        fleet.run("owner")

    def _frozen_and_sent(self, fault: Fault) -> tuple[str, list[str]]:
        """Round open, aggregator frozen, the held process released: its devices send and no
        receipt can come."""
        r, fleet = fault.round, self.fleet
        group = fault.evidence["held"]
        self.wait(lambda: self.aggregator_says(f"round {r} open") >= 1, f"round {r} open")
        fleet.pause("aggregator")
        fleet.resume(group)
        names = self.groups[group]
        self.wait(lambda: self.all_sent(names, r), f"{group} sent for round {r}")
        return group, names

    def _device_kill(self, fault: Fault) -> None:
        r, fleet = fault.round, self.fleet
        group, names = self._frozen_and_sent(fault)
        fleet.kill(group)
        awaiting = {}  # device -> the id of the update it had sent, from its state file
        for name in names:
            rounds, _ = fleet.device_state(name)
            state = next((s for s in rounds if s.round == r), None)
            if state is not None and state.phase == Phase.SENT and state.update_id is not None:
                awaiting[name] = state.update_id.hex()
        fault.evidence["killed_awaiting_receipt"] = len(awaiting)
        fault.evidence["awaiting"] = awaiting
        fleet.resume("aggregator")
        fleet.run_devices(group, names)

    def _forged_receipts(self, fault: Fault) -> None:
        fleet = self.fleet
        group, names = self._frozen_and_sent(fault)
        refusal = "receipt is not signed by the task's aggregator"
        refused_before = fleet.log(group).count(refusal)
        before = {name: fleet.device_state(name) for name in names}
        forger = fleet.node.new_account()
        domain = Domain(fleet.contract.chain_id, fleet.contract.address)
        topics = TaskTopics(fleet.task)
        forged = 0
        with MqttLink("soak-forger", fleet.broker.settings, lambda t, p: None, []) as link:
            for _, pending in before.values():
                for item in pending:
                    update = Update.decode(item.blob)
                    receipt = Receipt(
                        task=fleet.task_id,
                        round=update.round,
                        device=update.device,
                        update=item.blob_id,
                        accepted=True,
                        reason="",
                        counted_in=update.round,
                    ).signed(forger, domain)
                    link.publish(topics.receipts(update.device_address), receipt.encode())
                    forged += 1
        self.wait(
            lambda: fleet.log(group).count(refusal) - refused_before >= forged,
            f"{forged} forged receipts refused",
        )
        after = {name: fleet.device_state(name) for name in names}
        fault.evidence.update(
            forged=forged,
            refused=fleet.log(group).count(refusal) - refused_before,
            state_unchanged=after == before,
        )
        fleet.resume("aggregator")

    # --- accounting ------------------------------------------------------------------------

    def settle(self, seconds: float = 300.0) -> bool:
        """Wait until no device has an update waiting for its receipt (their last proofs and
        receipts arrive after the last model); False if some still wait."""
        names = [name for group in self.groups.values() for name in group]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not any(self.fleet.device_state(name)[1] for name in names):
                return True
            time.sleep(1.0)
        return False

    def account(self) -> dict[str, Any]:
        """Every update a device built against what the archive and the chain counted."""
        fleet, rounds = self.fleet, self.args.rounds
        archive, task = fleet.archive, fleet.task
        counted: dict[str, int] = {}  # archive id -> the round that counted it
        made: Counter[tuple[str, int]] = Counter()
        accepted = 0
        mismatches = []
        anchored = set()
        for round_no in range(1, rounds + 1):
            anchor = fleet.contract.round_anchor(fleet.task_id, round_no)
            if anchor is None:
                continue
            anchored.add(round_no)
            manifest = archive.round(task, round_no)
            if anchor.updates != len(manifest.updates):
                mismatches.append((round_no, anchor.updates, len(manifest.updates)))
            accepted += anchor.updates
            for ident in manifest.updates:
                _, update = archive.update(ident)
                made[(update.device_address.lower(), update.round)] += 1
                counted[ident] = round_no
        sent, lost = 0, []
        for index in range(self.args.devices):
            name = f"device-{index}"
            states, _ = fleet.device_state(name)
            for state in states:
                if state.update_id is None:
                    continue
                sent += 1
                if state.round in anchored and state.update_id.hex() not in counted:
                    lost.append({"device": name, "round": state.round, "phase": state.phase})
        double = [{"device": d, "made_for": r, "times": n} for (d, r), n in made.items() if n > 1]
        for fault in self.schedule.values():
            if fault.kind == "device-kill":  # the very bytes sent before the kill were counted
                awaiting = fault.evidence.get("awaiting", {})
                fault.evidence["awaiting_counted_as_sent"] = sum(
                    ident in counted for ident in awaiting.values()
                )
        return {
            "sent": sent,
            "accepted": accepted,
            "lost": len(lost),
            "lost_updates": lost,
            "double_counted": len(double),
            "double_counted_updates": double,
            "anchored_rounds": len(anchored),
            "chain_archive_mismatches": mismatches,
        }

    def round_close_times(self) -> dict[int, float]:
        """Seconds from each round's opening to its anchoring, from the aggregator's log (the
        first of each line: a restarted aggregator resumes a round without opening it again)."""
        opened: dict[int, datetime] = {}
        closed: dict[int, datetime] = {}
        for line in self.fleet.log("aggregator").splitlines():
            stamp = STAMP.match(line)
            if stamp is None:
                continue
            at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            if found := re.search(r"aggregator: round (\d+) open until", line):
                opened.setdefault(int(found.group(1)), at)
            elif found := re.search(r"aggregator: round (\d+) anchored in", line):
                closed.setdefault(int(found.group(1)), at)
        return {
            r: (closed[r] - opened[r]).total_seconds() for r in sorted(opened) if r in closed
        }  # fmt: skip


class SoakFailed(Exception):
    pass


def _broker_may_write(folder: Path) -> str:
    """Let mosquitto write its persistence file (and log) in ``folder``; why it cannot, if so.

    Started as root, mosquitto drops to the ``mosquitto`` user, which can neither write in a
    folder root made nor reach one under a 0700 folder (pytest's and ``mkdtemp``'s): it then
    persists nothing, silently, a restart loses every retained message, and the broker-restart
    fault would test a broker that forgets (the round announcement, which the aggregator
    publishes once, goes with it, and devices that had not yet seen it wait for ever)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return ""
    try:
        shutil.chown(folder, "mosquitto", "mosquitto")
    except LookupError:
        return ""  # no such user: mosquitto keeps root's rights
    for parent in folder.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            return f"the mosquitto user cannot reach {folder} ({parent} is not o+x)"
    return ""


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # gone between the look-up and the read
        return None
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 devices, 3 processes, 8 rounds")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="shuffle the faults' rounds")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep configurations, state and logs here")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.processes, args.rounds = 24, 3, 8
    if args.processes < 3 or args.devices < args.processes or args.rounds < len(KINDS) + 1:
        parser.error(f"needs 3+ processes, a device each, {len(KINDS) + 1}+ rounds")

    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="truscl-soak-"))
        workdir.chmod(0o755)  # mosquitto, as its own user, keeps its state in it
    else:
        workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    unreachable = _broker_may_write(workdir / "broker")
    if unreachable:
        parser.error(f"{unreachable}: give a --workdir it can reach")
    started = time.monotonic()
    failure = ""
    with Anvil(log=workdir / "anvil.log") as anvil:
        soak = Soak(args, workdir, anvil.url)
        print(
            f"soak: {args.devices} devices in {args.processes} processes, {args.rounds} rounds; "
            "faults: " + ", ".join(f"{f.kind}@{r}" for r, f in sorted(soak.schedule.items())),
            flush=True,
        )
        try:
            try:
                soak.start()
                print(f"set up in {time.monotonic() - started:.1f} s", flush=True)
                soak.run()
                settled = soak.settle()
            except SoakFailed as exc:
                failure, settled = str(exc), False
            figures = soak.account()
            audit = soak.fleet.audit().as_dict()
        finally:
            soak.close()
    close = soak.round_close_times()
    faulted = {f.round for f in soak.schedule.values()}
    clean_rounds = [s for r, s in close.items() if r not in faulted]
    faulted_rounds = [s for r, s in close.items() if r in faulted]
    rss = [mb for _, mb in soak.rss]
    # growth within the aggregator process that served longest, from the first round it
    # released (warm: its imports, contexts and first sums made) to its last
    by_pid: dict[int, list[float]] = {}
    for row in soak.rss_by_round:
        if row["pid"] is not None and row["mb"] is not None:
            by_pid.setdefault(row["pid"], []).append(row["mb"])
    longest = max(by_pid.values(), key=len, default=[])
    growth = (longest[-1] / longest[0] - 1) * 100 if len(longest) > 1 else float("nan")
    faults = [
        {"kind": f.kind, "round": f.round, "injected": f.injected, "recovered": f.recovered,
         **f.evidence}
        for f in sorted(soak.schedule.values(), key=lambda f: f.round)
    ]  # fmt: skip
    summary: dict[str, Any] = {
        "devices": args.devices,
        "processes": args.processes,
        "rounds": args.rounds,
        **figures,
        "round_close_s": close,
        "round_close_p50_s": _percentile(list(close.values()), 50),
        "round_close_p99_s": _percentile(list(close.values()), 99),
        "round_close_p50_s_no_fault": _percentile(clean_rounds, 50),
        "round_close_p50_s_fault": _percentile(faulted_rounds, 50),
        "aggregator_rss_mb": [round(mb, 1) for mb in rss],
        "aggregator_rss_t_s": [round(t, 1) for t, _ in soak.rss],
        "aggregator_rss_by_round": soak.rss_by_round,
        "aggregator_rss_steady_rounds": len(longest),
        "aggregator_rss_growth_pct": growth,
        "audit": audit,
        "faults": faults,
        "not_injected": NOT_INJECTED,
        "settled": settled,
        "failure": failure,
        "seconds": time.monotonic() - started,
        "workdir": str(workdir),
    }
    ok = (
        not failure
        and figures["lost"] == 0
        and figures["double_counted"] == 0
        and not figures["chain_archive_mismatches"]
        and audit["verified"] == audit["total"] == args.rounds
        and all(f["injected"] and f["recovered"] for f in faults)
    )
    summary["ok"] = ok
    _print(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    if args.workdir is None and ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _print(s: dict[str, Any]) -> None:
    print(f"\nsoak: {s['devices']} devices, {s['processes']} processes, {s['rounds']} rounds")
    print(f"  sent {s['sent']}, accepted {s['accepted']} (in {s['anchored_rounds']} anchored")
    print(f"  rounds), lost {s['lost']}, double-counted {s['double_counted']}")
    print(
        f"  round open -> anchor: p50 {s['round_close_p50_s']:.2f} s, p99 "
        f"{s['round_close_p99_s']:.2f} s; baseline (rounds without a fault) p50 "
        f"{s['round_close_p50_s_no_fault']:.2f} s, rounds with one p50 "
        f"{s['round_close_p50_s_fault']:.2f} s"
    )
    rss = s["aggregator_rss_mb"]
    at_release = [row["mb"] for row in s["aggregator_rss_by_round"] if row["mb"] is not None]
    print(
        f"  aggregator RSS: {len(rss)} samples, {min(rss, default=0):.0f}-{max(rss, default=0):.0f}"
        f" MB; at each release {', '.join(f'{mb:.0f}' for mb in at_release)} MB; over the "
        f"{s['aggregator_rss_steady_rounds']} rounds of its longest-lived process "
        f"{s['aggregator_rss_growth_pct']:+.1f} %"
    )
    audit = s["audit"]
    print(f"  audit: {audit['verified']}/{audit['total']} rounds verified")
    for fault in s["faults"]:
        extra = {k: v for k, v in fault.items() if k not in ("kind", "round", "awaiting")}
        print(f"  fault {fault['kind']:16s} round {fault['round']:3d}: {extra}")
    for kind, why in s["not_injected"].items():
        print(f"  not injected: {kind}: {why}")
    if s["failure"]:
        print(f"FAILED: {s['failure']}")
    print(f"  {s['seconds']:.0f} s in all; {'ok' if s['ok'] else 'NOT OK'}")


if __name__ == "__main__":
    sys.exit(main())
