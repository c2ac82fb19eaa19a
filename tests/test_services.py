"""The owner, the aggregator and two agents as separate ``truscl`` processes on a real node.

Each role runs from its own TOML file exactly as its systemd unit runs it; the owner is stopped
and restarted in the middle of the task and takes it up from its state folder and the chain.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, NodeChain
from truscl.keyfile import load_or_create_account, write_secret
from truscl.server.archive import Archive
from truscl.server.audit import audit_task
from truscl.server.config import AggregatorConfig, OwnerConfig

pytestmark = pytest.mark.slow
TRUSCL = str(Path(sys.executable).with_name("truscl"))
ROOT = Path(__file__).resolve().parents[1]

TASK_FILE = (ROOT / "deploy" / "task.toml").read_text()
BROKER = """
[broker]
host = "127.0.0.1"
port = {port}
[chain]
rpc = "{rpc}"
contract = "{contract}"
"""
OWNER = """
task_file = "task.toml"
aggregator = "{aggregator}"
[owner]
key = "owner.key"
state = "state"
"""
AGGREGATOR = """
task = "{task}"
expected_devices = 2
[aggregator]
key = "aggregator.key"
archive = "archive"
"""
AGENT = """
task = "{task}"
[device]
key = "device.key"
state = "state"
name = "device-{index}"
[sensors]
hardware = "simulated"
room = {index}
seed = 3
time_scale = 60000
"""


def start(
    role: str, config: Path, log: Path, notify: Path | None = None
) -> subprocess.Popen[bytes]:
    """``truscl ROLE run``, with systemd's notification socket and a 2 s watchdog if given."""
    env = dict(os.environ)
    if notify is not None:
        env.update(NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="2000000")
    return subprocess.Popen(
        [TRUSCL, "--log-level", "INFO", role, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env=env,
    )


def notifications(sock: socket.socket, until: bytes) -> list[bytes]:
    """Datagrams from a service, up to and including the first that contains ``until``."""
    received: list[bytes] = []
    while not any(until in message for message in received):
        received.append(sock.recv(4096))  # the socket's timeout bounds the wait
    return received


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(30)


def wait_for_model(chain: ChainClient, task: bytes, round_no: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if chain.model_hash(task, round_no) is not None:
            return True
        time.sleep(0.2)
    return False


def test_roles_as_services_complete_a_task_across_an_owner_restart(
    anvil: str, tmp_path: Path
) -> None:
    # Prepare: a node with the contract, a broker, one folder and config per role
    node = NodeChain(anvil)
    admin = ChainClient.deploy(node.web3(), node.new_account(), node.lock)
    folders = {name: tmp_path / name for name in ("owner", "aggregator", "device-0", "device-1")}
    for folder in folders.values():
        folder.mkdir()
    for name in ("owner", "aggregator"):
        write_secret(folders[name] / f"{name}.key", node.new_account().key)
    aggregator_address = load_or_create_account(folders["aggregator"] / "aggregator.key").address
    for index in range(2):
        device = load_or_create_account(folders[f"device-{index}"] / "device.key")
        admin.register_device(device.address)
    task_file = TASK_FILE.replace("rounds = 10", "rounds = 3").replace("quorum = 3", "quorum = 2")
    (folders["owner"] / "task.toml").write_text(
        task_file.replace("window = 864", "window = 128").replace(
            "batch_size = 32", "batch_size = 16"
        )
    )
    processes: dict[str, subprocess.Popen[bytes]] = {}
    with Mosquitto(tmp_path / "broker") as broker:
        common = BROKER.format(port=broker.port, rpc=anvil, contract=admin.address)
        owner_toml = folders["owner"] / "owner.toml"
        owner_toml.write_text(OWNER.format(aggregator=aggregator_address) + common)
        OwnerConfig.load(owner_toml)  # the file a user would write is valid

        # Execute: init as a command, then every role as a service
        init = subprocess.run(
            [TRUSCL, "owner", "init", "--config", str(owner_toml)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        task = init.stdout.strip()
        again = subprocess.run(
            [TRUSCL, "owner", "init", "--config", str(owner_toml)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        aggregator_toml = folders["aggregator"] / "aggregator.toml"
        aggregator_toml.write_text(AGGREGATOR.format(task=task) + common)
        AggregatorConfig.load(aggregator_toml)
        logs = {name: tmp_path / f"{name}.log" for name in folders}
        sockets = {}
        for name in ("owner", "aggregator", "device-0"):
            sockets[name] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sockets[name].bind(str(tmp_path / f"{name}.notify"))
            sockets[name].settimeout(60)
        notify = {name: tmp_path / f"{name}.notify" for name in sockets}
        processes["owner"] = start("owner", owner_toml, logs["owner"], notify["owner"])
        processes["aggregator"] = start(
            "aggregator", aggregator_toml, logs["aggregator"], notify["aggregator"]
        )
        for index in range(2):
            name = f"device-{index}"
            config = folders[name] / "agent.toml"
            config.write_text(AGENT.format(task=task, index=index) + common)
            processes[name] = start("agent", config, logs[name], notify.get(name))
        # systemd's view: each service says READY once up, then pings its watchdog
        told = {name: notifications(sockets[name], b"WATCHDOG=1") for name in sockets}
        task_id = bytes.fromhex(task[2:])
        try:
            first = wait_for_model(admin, task_id, 1, 120)
            owner_stopped = stop(processes.pop("owner"))
            processes["owner"] = start("owner", owner_toml, tmp_path / "owner-again.log")
            last = wait_for_model(admin, task_id, 3, 120)
        finally:
            codes = {name: stop(process) for name, process in processes.items()}
    text = {name: log.read_text() for name, log in logs.items()}

    # Assert: a second init refuses, the restarted owner finished the task, all stopped cleanly
    for name, messages in told.items():
        assert messages[0].startswith(b"READY=1"), (name, messages)
    assert again.returncode == 1 and "already holds task" in again.stderr, again.stderr
    assert first and last, text
    assert owner_stopped == 0 and codes == dict.fromkeys(codes, 0), text
    report = audit_task(
        ChainClient.at(node.web3(), admin.address), Archive(folders["aggregator"] / "archive"), task
    )
    assert (report.verified, report.total) == (3, 3), report.as_dict()
    resumed = (tmp_path / "owner-again.log").read_text()
    assert "resumed at model" in resumed and "released model 3" in resumed
    for index in range(2):
        assert "round 3 update included on chain" in text[f"device-{index}"]
