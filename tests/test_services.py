"""The owner, a key guardian, the aggregator and the agents as separate ``truscl`` processes on
a real node.

Each role runs from its own TOML file exactly as its systemd unit runs it, tells systemd
(a notification socket here) when it is ready and feeds its watchdog; the owner is stopped and
restarted in the middle of the task and takes it up from its state folder and the chain.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from harness import TRUSCL, Fleet
from prometheus_client.parser import text_string_to_metric_families

from truscl.processes import children
from truscl.server.journal import Journal

pytestmark = pytest.mark.slow


def notifications(sock: socket.socket, until: bytes) -> list[bytes]:
    """Datagrams from a service, up to and including the first that contains ``until``."""
    received: list[bytes] = []
    while not any(until in message for message in received):
        received.append(sock.recv(4096))  # the socket's timeout bounds the wait
    return received


def test_roles_as_services_complete_a_task_across_an_owner_restart(
    anvil: str, tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path, anvil, devices=2, terms={"rounds": 3, "quorum": 2})
    sockets, env = {}, {}
    for name in ("owner", "guardian-1", "aggregator", "device-0"):
        sockets[name] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sockets[name].bind(str(tmp_path / f"{name}.notify"))
        sockets[name].settimeout(60)
        env[name] = {"NOTIFY_SOCKET": str(tmp_path / f"{name}.notify"), "WATCHDOG_USEC": "2000000"}
    try:
        fleet.start(env)
        again = subprocess.run(
            [TRUSCL, "owner", "init", "--config", str(fleet.config("owner"))],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        # systemd's view of each service: READY once it is up, then watchdog pings
        told = {name: notifications(sockets[name], b"WATCHDOG=1") for name in sockets}
        fleet.wait_for_model(1)
        owner_stopped = fleet.stop("owner")
        fleet.run("owner")
        fleet.wait_for_model(3)
        report = fleet.audit()
    finally:
        codes = fleet.close()

    # Assert: a second init refuses, every service told systemd it was ready, the restarted
    # owner finished the task, the audit holds and every process stopped cleanly
    assert again.returncode == 1 and "already holds task" in again.stderr, again.stderr
    for name, messages in told.items():
        assert messages[0].startswith(b"READY=1"), (name, messages)
    assert owner_stopped == 0 and codes == dict.fromkeys(codes, 0), fleet.logs()
    assert (report.verified, report.total) == (3, 3), report.as_dict()
    owner_log = fleet.log("owner")
    assert "resumed at model 1" in owner_log and "released model 3" in owner_log
    guardian_log = fleet.log("guardian-1")
    partials = fleet.folders["owner"] / "state" / "partials"
    for round_no in (1, 2, 3):
        assert f"decrypted its part of round {round_no}" in guardian_log
        assert (partials / f"{round_no}.partial").stat().st_mode & 0o777 == 0o600  # once each
    for index in range(2):
        assert "round 3 update included on chain" in fleet.log(f"device-{index}")


def worker_processes(parent: int) -> list[int]:
    """The ``multiprocessing`` workers (not its resource tracker) that ``parent`` started."""
    found = []
    for pid in children(parent):
        with contextlib.suppress(OSError):  # gone meanwhile
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in command and b"resource_tracker" not in command:
                found.append(pid)
    return found


def test_a_hung_worker_of_the_aggregator_withholds_its_watchdog_pings(
    anvil: str, tmp_path: Path
) -> None:
    # Prepare: the aggregator service with workers = 2, under a watchdog of 2 s; its second
    # process up and taking updates
    fleet = Fleet(tmp_path, anvil, devices=2, terms={"rounds": 2, "quorum": 2})
    fleet.aggregator_workers = 2
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "aggregator.notify"))
    systemd.settimeout(60)
    env = {"NOTIFY_SOCKET": str(tmp_path / "aggregator.notify"), "WATCHDOG_USEC": "2000000"}
    stopped: list[int] = []

    def said(text: str) -> int:
        return fleet.log("aggregator").count(text)

    try:
        fleet.start({"aggregator": env})
        fleet.wait_for(lambda: said("shard 1 of 2 takes updates"), "shard 1 up")
        assert notifications(systemd, b"WATCHDOG=1")[0].startswith(b"READY=1")
        workers = worker_processes(fleet.processes["aggregator"].pid)
        assert len(workers) == 1, workers
        withheld, resumed = said("no beat for 'shard-1'"), said("watchdog pings resume")
        # Execute: the worker hangs (alive, connected, doing nothing), then comes back
        os.kill(workers[0], signal.SIGSTOP)
        stopped.append(workers[0])
        fleet.wait_for(lambda: said("no beat for 'shard-1'") > withheld, "pings withheld")
        os.kill(stopped.pop(), signal.SIGCONT)
        fleet.wait_for(lambda: said("watchdog pings resume") > resumed, "pings resumed")
        fleet.wait_for_model(2)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        codes = fleet.close()
        systemd.close()

    # Assert: the hang was seen (under systemd, the service would have been restarted), and
    # once the worker went on, so did the task, to a clean stop
    assert codes == dict.fromkeys(codes, 0), fleet.logs()


def test_a_task_whose_model_outgrows_a_spec_message_runs_end_to_end(
    anvil: str, tmp_path: Path
) -> None:
    # Prepare: 10,003 parameters (over four features, (4 + 2) * 1667 + 1): the released model
    # is 80 KB, over the 64 KiB of a spec message, and each update three ciphertexts, 197 KB,
    # two chunks of the task's 128 KiB messages
    terms = {"rounds": 2, "quorum": 2, "model": "mlp", "hidden": [1667]}
    fleet = Fleet(tmp_path, anvil, devices=2, terms=terms)
    try:
        fleet.start()
        fleet.wait_for_model(2)
        report = fleet.audit()
        manifest = fleet.archive.round(fleet.task, 2)
        archived = [fleet.archive.update(ident)[0] for ident in manifest.updates]
    finally:
        codes = fleet.close()

    # Assert: each device took the model of round 1 from the broker, trained on it and had its
    # round 2 update counted; the rounds hold up to the audit
    assert codes == dict.fromkeys(codes, 0), fleet.logs()
    assert (report.verified, report.total) == (2, 2), report.as_dict()
    assert len(archived) == 2 and all(len(blob) > 3 * 65_000 for blob in archived)
    for index in range(2):
        assert "round 2 update included on chain" in fleet.log(f"device-{index}")


def accepted(port: int) -> float:
    """``truscl_updates_accepted_total`` as a service's ``/metrics`` serves it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return next(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "truscl_updates_accepted_total"
    )


def test_an_aggregator_of_two_workers_shares_the_updates_and_completes_the_task(
    anvil: str, tmp_path: Path
) -> None:
    # Prepare: the aggregator service with workers = 2: a second process, one shared
    # subscription through which the broker hands each update to one of them
    fleet = Fleet(tmp_path, anvil, devices=3, terms={"rounds": 2, "quorum": 3})
    fleet.aggregator_workers = 2
    fleet.aggregator_tables = "[metrics]\nport = 0\n"
    try:
        fleet.start()
        fleet.wait_for_model(2)
        report = fleet.audit()
        journal = Journal.read_only(fleet.folders["aggregator"] / "archive" / "journal"
                                    / f"{fleet.task}.sqlite")  # fmt: skip
        counted = [journal.updates(round_no) for round_no in (1, 2)]
        journal.close()
        # what the service's /metrics says it accepted: both processes' counts, once the
        # second process's report is in
        serving = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", fleet.log("aggregator"))
        assert serving is not None
        fleet.wait_for(lambda: accepted(int(serving[1])) == 6, "6 updates accepted at /metrics")
    finally:
        codes = fleet.close()

    # Assert: both processes counted updates, each round every device once, and the rounds
    # (merged from the two partial sums) hold up to the audit
    assert codes == dict.fromkeys(codes, 0), fleet.logs()
    assert (report.verified, report.total) == (2, 2), report.as_dict()
    assert [len({u.device for u in updates}) for updates in counted] == [3, 3]
    assert {u.shard for updates in counted for u in updates} == {0, 1}
    assert "shard 1 handed in round 2" in fleet.log("aggregator")
