"""A fleet of ``truscl`` service processes on a real broker and a real node, for tests that
start, stop, kill and restart roles as an operator (or a crash) would.

Every role runs from its own TOML file as its systemd unit runs it; the broker is a plain
mosquitto (anonymous, persistent) on a free port, the chain an anvil the caller provides. The
task is in threshold mode: the owner shares the key with one guardian, its own process, whose
``guardian init`` runs alongside ``owner init``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from truscl.agent.outbox import Outbox, Pending
from truscl.agent.rounds import RoundState
from truscl.agent.sensors import Reading
from truscl.broker import Mosquitto, free_port
from truscl.chain import ChainClient, NodeChain
from truscl.keyfile import load_or_create_account, write_secret
from truscl.privacy.accounting import PrivacyLedger
from truscl.processes import stop_process
from truscl.server.archive import Archive
from truscl.server.audit import AuditReport, audit_task

TRUSCL = str(Path(sys.executable).with_name("truscl"))
ROOT = Path(__file__).resolve().parents[1]

CHAIN = """
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
task = "{task}"
[owner]
key = "owner.key"
state = "state"
[guardians]
guardian-1 = "{guardian}"
"""
GUARDIAN = """
task = "{task}"
owner = "{owner}"
[guardian]
name = "guardian-1"
key = "guardian.key"
state = "state"
"""
AGGREGATOR = """
task = "{task}"
expected_devices = {devices}
[aggregator]
key = "aggregator.key"
archive = "archive"
workers = {workers}
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
time_scale = {time_scale}
history = {history}
"""


def task_file(**terms: object) -> str:
    """deploy/task.toml with some terms changed (a small window, so devices train at once)."""
    text = (ROOT / "deploy" / "task.toml").read_text()
    terms = {"window": 128, "min_readings": 128, "batch_size": 16, **terms}
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in terms and "=" in line:
            value = terms[key]
            text = text.replace(
                line, f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"'
            )
    return text


def synthetic_readings(n: int, seed: int = 5) -> list[Reading]:
    """``n`` plausible readings of a room, for tests of what a device makes of a window."""
    rng = np.random.default_rng(seed)
    return [
        Reading(
            timestamp=float(i),
            temperature_c=float(rng.uniform(18, 26)),
            humidity_pct=float(rng.uniform(30, 60)),
            pressure_hpa=1013.0,
            light_lux=float(rng.uniform(0, 800)),
            co2_ppm=float(rng.uniform(400, 1500)),
            motion=bool(i % 3 == 0),
        )
        for i in range(n)
    ]


@dataclass
class Fleet:
    """The roles of one task, each a process; ``start`` runs ``owner init`` first."""

    root: Path
    rpc: str
    devices: int = 3
    terms: dict[str, object] = field(default_factory=dict)
    time_scale: float = 60000.0
    broker_port: int | None = None
    aggregator_workers: int = 1
    aggregator_tables: str = ""  # more of aggregator.toml, such as a [metrics] table
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    task: str = ""

    def __post_init__(self) -> None:
        self.node = NodeChain(self.rpc)
        admin = self.node.new_account()
        self.contract = ChainClient.deploy(self.node.web3(), admin, self.node.lock)
        self.broker = Mosquitto(self.root / "broker", port=self.broker_port, persistent=True)
        self.folders = {name: self.root / name for name in self.role_names}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for name in ("owner", "aggregator"):
            write_secret(self.folders[name] / f"{name}.key", self.node.new_account().key)
        write_secret(self.folders["guardian-1"] / "guardian.key", self.node.new_account().key)
        for index in range(self.devices):
            device = load_or_create_account(self.folders[f"device-{index}"] / "device.key")
            self.contract.register_device(device.address)

    @property
    def role_names(self) -> list[str]:
        return [
            "owner", "guardian-1", "aggregator", *(f"device-{i}" for i in range(self.devices))
        ]  # fmt: skip

    @property
    def task_id(self) -> bytes:
        return bytes.fromhex(self.task[2:])

    def config(self, name: str) -> Path:
        return self.folders[name] / f"{_role(name)}.toml"

    def start(
        self, env: dict[str, dict[str, str]] | None = None, hold: tuple[str, ...] = ()
    ) -> Fleet:
        """``owner init`` with ``guardian init`` beside it (the key generation), then every
        role but those in ``hold`` (the test runs them later); ``env`` adds variables to some
        roles' environment."""
        self.broker.start()
        chain = CHAIN.format(port=self.broker.port, rpc=self.rpc, contract=self.contract.address)
        owner = self.folders["owner"]
        (owner / "task.toml").write_text(task_file(**self.terms))
        aggregator = load_or_create_account(self.folders["aggregator"] / "aggregator.key")
        guardian = load_or_create_account(self.folders["guardian-1"] / "guardian.key")
        owner_account = load_or_create_account(owner / "owner.key")
        task = "0x" + secrets.token_hex(32)
        self.config("owner").write_text(
            OWNER.format(aggregator=aggregator.address, task=task, guardian=guardian.address)
            + chain
        )
        self.config("guardian-1").write_text(
            GUARDIAN.format(task=task, owner=owner_account.address) + chain
        )
        joining = subprocess.Popen(
            [TRUSCL, "guardian", "init", "--config", str(self.config("guardian-1"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        init = subprocess.run(
            [TRUSCL, "owner", "init", "--config", str(self.config("owner"))],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        _, joined = joining.communicate(timeout=120)
        assert init.returncode == 0, init.stderr
        assert joining.returncode == 0, joined
        self.task = init.stdout.strip()
        assert self.task == task
        self.config("aggregator").write_text(
            AGGREGATOR.format(task=self.task, devices=self.devices, workers=self.aggregator_workers)
            + chain
            + self.aggregator_tables
        )
        for index in range(self.devices):
            self.config(f"device-{index}").write_text(
                AGENT.format(
                    task=self.task,
                    index=index,
                    time_scale=self.time_scale,
                    history=self.terms.get("window", 128),
                )
                + chain
            )
        for name in self.role_names:
            if name not in hold:
                self.run(name, (env or {}).get(name))
        return self

    def run(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        role = _role(name)
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [TRUSCL, "--log-level", "INFO", role, "run", "--config", str(self.config(name))],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        return self.processes[name]

    def run_devices(
        self, group: str, names: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Several devices in one ``truscl agent run`` process, a ``--config`` each, as the demo
        hosts a large fleet (a process per device costs an interpreter and its imports each).
        The process and its log go by ``group``: stop, kill, pause, resume and log take it."""
        log = (self.root / f"{group}.log").open("ab")
        command = [TRUSCL, "--log-level", "INFO", "agent", "run"]
        for name in names:
            command += ["--config", str(self.config(name))]
        self.processes[group] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})}
        )
        return self.processes[group]

    def stop(self, name: str) -> int | None:
        """SIGTERM, as systemd stops a unit."""
        return stop_process(self.processes.pop(name), 30)

    def kill(self, name: str) -> None:
        """``kill -9``: no cleanup, no goodbye."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process keeps its memory and its connections but does nothing (an
        aggregator that is there, yet sends no receipt)."""
        self.processes[name].send_signal(signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGCONT)
        self.paused.discard(name)

    def device_state(self, name: str) -> tuple[list[RoundState], list[Pending]]:
        """A device's round states and outbox, read from its state file (it may be running)."""
        path = self.folders[name] / "state" / "outbox.sqlite"
        if not path.exists():
            return [], []
        state = Outbox(path)
        try:
            return state.rounds(), state.pending()
        finally:
            state.close()

    def ledger(self, name: str) -> PrivacyLedger:
        path = self.folders[name] / "state" / "privacy-ledger.json"
        return PrivacyLedger.from_json(path.read_text()) if path.exists() else PrivacyLedger()

    @property
    def archive(self) -> Archive:
        return Archive(self.folders["aggregator"] / "archive")

    def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {seconds}s\n{self.logs()}")
            time.sleep(0.1)

    def model_released(self, round_no: int) -> bool:
        return self.contract.model_hash(self.task_id, round_no) is not None

    def wait_for_model(self, round_no: int, seconds: float = 120) -> None:
        self.wait_for(lambda: self.model_released(round_no), f"model {round_no}", seconds)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, lines: int = 12) -> str:
        return "\n".join(
            f"--- {name}\n" + "\n".join(self.log(name).splitlines()[-lines:])
            for name in self.role_names
        )

    def audit(self) -> AuditReport:
        reader = ChainClient.at(self.node.web3(), self.contract.address)
        return audit_task(reader, self.archive, self.task)

    def close(self) -> dict[str, int | None]:
        """Stop every role still running (SIGTERM) and the broker; their exit codes."""
        for name in list(self.paused):
            self.resume(name)
        codes = {name: self.stop(name) for name in list(self.processes)}
        self.broker.stop()
        return codes


def _role(name: str) -> str:
    """The ``truscl`` command group (and config file name) of a fleet member."""
    if name.startswith("device"):
        return "agent"
    return "guardian" if name.startswith("guardian") else name


class TcpGate:
    """A TCP forwarder to ``target_port`` that can be shut: a node unreachable for one role only.

    Pausing the node itself (SIGSTOP) stalls every role that reads the chain, the devices and the
    owner too, so when an outage starts relative to a round would depend on their timing. Behind
    a gate, one role loses the node at the moment the test chooses, and the node keeps its state.
    While shut, connections are refused and open ones are cut, as when a node goes down.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> TcpGate:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, []
        for sock in [s for s in (listener,) if s is not None] + sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # shut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
