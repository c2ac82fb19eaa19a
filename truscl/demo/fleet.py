"""``truscl demo``: the deployment a user runs, on one machine, each role its own OS process.

The launcher does what an operator does: it makes each device's key, provisions the broker
(a test CA, one TLS client identity and login per role, guardian and device, an ACL) and starts
it, starts a development node (anvil) unless one is given, deploys the contract (its record in
``deployment.json``), registers the devices, creates the task with ``owner init`` while
``truscl guardian init`` joins its key generation (threshold mode, the default: the owner and
one key guardian share the CKKS key), and starts ``truscl owner run``, ``truscl guardian run``,
``truscl aggregator run`` and one ``truscl agent run`` per device, each from its own TOML file,
with its log in ``logs/``. It follows the task on the chain, reads each
round from the aggregator's archive and the owner's released models, audits the task, then stops
every process with SIGTERM, as systemd would.

Devices read simulated rooms through the real drivers (the ``simulated`` hardware backend),
starting on a fixed date with three days of readings behind them, or their part of a recorded
trace (the ``trace`` backend, :mod:`truscl.demo.data`), sensing in accelerated time; the
centralised baseline is trained on the devices' training data pooled.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from eth_account import Account

from truscl.agent.provision import provision_agent
from truscl.agent.sensors import Reading
from truscl.broker import Mosquitto, free_port
from truscl.broker.provision import Provisioned, provision_broker
from truscl.chain import ChainClient, NodeChain, deploy
from truscl.chain.anvil import Anvil
from truscl.config import broker_table, render_toml
from truscl.demo.common import (
    READINGS_PER_ROUND,
    DemoConfig,
    DemoFailed,
    RoundRow,
    accuracy,
    baseline_accuracy,
    summarise,
    task_toml,
    write_demo_report,
)
from truscl.demo.data import DemoData
from truscl.errors import ChainError
from truscl.keyfile import load_account, load_or_create_account, write_secret
from truscl.mqtt import KEEPALIVE_S
from truscl.processes import stop_process
from truscl.progress import Progress
from truscl.server.archive import Archive
from truscl.server.audit import audit_task
from truscl.server.config import OwnerConfig
from truscl.server.owner import ModelStore
from truscl.server.owner_service import init_task
from truscl.task import TaskSpec
from truscl.wire.model import model_from_bytes

log = logging.getLogger(__name__)

GAS_MONEY_WEI = 10**19
GUARDIAN = "guardian-1"  # the demo's one key guardian (its broker identity and holder name)
ROUND_SECONDS_REAL = 3.0  # real seconds in which a device takes a round's worth of readings
READ_CPU_S = 0.0004  # CPU seconds one simulated reading costs through the drivers (measured)
SENSING_CPU = 0.25  # the most of one core the devices' simulated sensors may take together
POLL_S = 0.2
DEVICE_PROCESSES = 8  # beyond this many devices, device processes host several each
SHARED_KEEPALIVE_S = 120  # MQTT keepalive of devices sharing a process (see ``keepalive``)
STOP_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 600.0  # a process's imports take seconds each, many at once on 2 cores
STARTUP_PER_DEVICE_S = 1.5  # and each device it hosts starts in turn: its simulated past, its
# broker session and chain reads (about 0.8 s of CPU with its first round, 1,000 on 2 cores)


@dataclass
class Role:
    """One ``truscl`` service process of the demo."""

    name: str
    command: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notify_path: Path | None = None
    metrics_port: int | None = None  # its /metrics (and the aggregator's status page)
    ready: bool = False  # it said READY=1

    def start(self, log_format: str = "text") -> None:
        """Start it as systemd would a ``Type=notify`` unit: with a notification socket of its
        own, on which the service says ``READY=1`` once it is connected."""
        # In the temporary folder, not the workdir: a socket's path has at most 107 bytes.
        path = Path(tempfile.gettempdir()) / f"truscl-{os.getpid()}-{self.name}.notify"
        path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(path))
        self.notify_path = path
        command = ["--log-level", "INFO", "--log-format", log_format, *self.command]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "truscl.cli", *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            env={**os.environ, "NOTIFY_SOCKET": str(path)},
        )

    def wait_ready(self, deadline: float) -> None:
        """Until the service said READY=1; ``DemoFailed`` if it stopped or ``deadline`` passed."""
        assert self.notify is not None
        while True:
            remaining = deadline - time.monotonic()
            if not self.running():
                raise DemoFailed(f"{self.name} stopped while starting:\n{self.tail()}")
            if remaining <= 0:
                raise DemoFailed(f"{self.name} did not start in time:\n{self.tail()}")
            self.notify.settimeout(min(remaining, 1.0))
            try:
                if b"READY=1" in self.notify.recv(4096):
                    self.ready = True
                    return
            except TimeoutError:
                continue

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, as systemd stops a unit; the exit code (None if it had to be killed)."""
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if self.notify_path is not None:
            self.notify_path.unlink(missing_ok=True)
        return None if self.process is None else stop_process(self.process, STOP_TIMEOUT_S)

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def run_fleet(config: DemoConfig, data: DemoData, out: TextIO) -> dict[str, Any]:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="truscl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    test = data.test_set()
    roles: list[Role] = []
    with ExitStack() as stack:
        stack.callback(_stop_all, roles)
        addresses = [
            _device_address(workdir / "devices" / str(index)) for index in range(config.devices)
        ]
        broker = provision_broker(
            workdir / "broker",
            addresses,
            hosts=("127.0.0.1",),
            port=free_port(),
            bind="127.0.0.1",
            guardians=1 if config.he_mode == "threshold" else 0,
        )
        stack.enter_context(Mosquitto.provisioned(broker.conf))
        rpc = config.rpc or stack.enter_context(Anvil(log=workdir / "logs" / "anvil.log")).url
        node = NodeChain(rpc)
        admin = _funded_key(node, workdir / "admin" / "admin.key")
        deployment = deploy(node.web3(), admin, rpc_url=rpc, lock=node.lock)
        deployment.save(workdir / "deployment.json")
        contract = ChainClient.at(node.web3(), deployment.address, admin, node.lock)
        _register(contract, addresses)

        spec = _create_task(config, data, workdir, node, contract.address, broker, rpc)
        archive = workdir / "aggregator" / "archive"
        roles += _start_services(config, data, workdir, spec, contract.address, broker, rpc)
        if data.note:
            print(f"truscl demo: {data.note}", file=out)
        print(
            f"truscl demo: {config.devices} devices, {config.rounds} rounds, "
            f"{len(roles)} processes, broker mqtts://127.0.0.1:{broker.port} (TLS, ACL), "
            f"chain {rpc}, contract {contract.address}",
            file=out,
        )
        period = read_period(config.devices)
        if period > ROUND_SECONDS_REAL / READINGS_PER_ROUND:
            print(
                f"truscl demo: devices sense a round's readings in "
                f"{period * READINGS_PER_ROUND:.0f} s, not "
                f"{ROUND_SECONDS_REAL:g} s: the simulated sensors of {config.devices} devices "
                f"may take {SENSING_CPU:g} of a core",
                file=out,
            )
        starting = time.monotonic() + STARTUP_TIMEOUT_S + STARTUP_PER_DEVICE_S * config.devices
        for role in roles:  # the rounds are timed from when every service is up
            if not role.ready:
                role.wait_ready(starting)
        reader = ChainClient.at(node.web3(), contract.address)
        rows = []
        round_started = time.monotonic()
        with Progress("rounds", config.rounds, plain=False) as progress:  # a bar on a terminal
            for round_no in range(1, config.rounds + 1):
                if config.drop_device_at == round_no:
                    dropped = roles[-1]  # the last device, alone in its process
                    dropped.stop()
                    progress.print(f"  ({dropped.name} stops before round {round_no})", out)
                _wait_for_model(config, reader, spec, round_no, roles)
                seconds, round_started = time.monotonic() - round_started, time.monotonic()
                row = _round_row(spec, Archive(archive), workdir, round_no, test, seconds)
                rows.append(row)
                progress.print(row.line(config.devices), out)
                progress.advance(f"round {round_no}, accuracy {row.accuracy:.3f}")
        report = audit_task(reader, Archive(archive), spec.task)
        refused = [r for r in range(1, config.rounds + 1) if reader.round_refusal(spec.task_id, r)]
        _scrape(roles, workdir / "metrics")
        models = ModelStore(workdir / "owner" / "state" / "models").all(spec.n_params)
        summary_md = write_demo_report(
            config, reader, Archive(archive), spec, models, test, workdir, data.note
        )
        codes = _stop_all(roles)
    unclean = {name: code for name, code in codes.items() if code != 0}
    if unclean:
        print(f"warning: not every process stopped cleanly: {unclean}", file=out)
    initial = model_from_bytes(
        (workdir / "owner" / "state" / "models" / "0.model").read_bytes(), spec.n_params
    )
    baseline = baseline_accuracy(spec, data.pooled(config.rounds, spec.window), test, initial)
    summary = summarise(
        config,
        rows,
        baseline,
        spec,
        report.as_dict(),
        time.monotonic() - started,
        {
            "refused_rounds": refused,
            "chain": rpc,
            "contract": contract.address,
            "workdir": str(workdir),
            "processes": len(codes),
            "stopped_cleanly": not unclean,
            "report": str(summary_md),
        },
        out,
    )
    print(f"report: {summary_md}", file=out)
    if config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"keys, configurations, archive and logs kept in {workdir}", file=out)
    return summary


def _device_address(folder: Path) -> str:
    """A device's address, its key made on first use (the broker's ACL and the registry need
    it before the device's configuration is written)."""
    return load_or_create_account(folder / "device.key").address


def _register(contract: ChainClient, addresses: list[str]) -> None:
    """Register the fleet at once (sent together, then awaited); a refusal stops the demo."""
    for outcome in contract.register_devices(addresses):
        if isinstance(outcome, ChainError):
            raise outcome


def _funded_key(node: NodeChain, path: Path) -> Any:
    """A fresh role key in a 0600 file, funded for gas from the node's unlocked account."""
    account = Account.create()
    if path.exists():
        path.unlink()
    write_secret(path, bytes(account.key))
    node.fund(account.address, GAS_MONEY_WEI)
    return account


def _create_task(
    config: DemoConfig,
    data: DemoData,
    workdir: Path,
    node: NodeChain,
    contract: str,
    broker: Provisioned,
    rpc: str,
) -> TaskSpec:
    """Write the owner's task file and configuration, then ``owner init`` (in threshold mode
    with ``guardian init`` beside it: the key generation needs both)."""
    folder = workdir / "owner"
    folder.mkdir(parents=True, exist_ok=True)
    owner = _funded_key(node, folder / "owner.key")
    aggregator = _funded_key(node, workdir / "aggregator" / "aggregator.key")
    (folder / "task.toml").write_text(task_toml(config, data.most_readings))
    chain = {"rpc": rpc, "contract": contract}
    top: dict[str, Any] = {"task_file": "task.toml", "aggregator": aggregator.address}
    tables: dict[str, dict[str, Any]] = {
        "owner": {"key": "owner.key", "state": "state"},
        "broker": broker_table(broker.settings("owner")),
        "chain": chain,
        "metrics": {"port": free_port()},
    }
    joining: subprocess.Popen[bytes] | None = None
    if config.he_mode == "single-key":
        top["he_mode"] = "single-key"
    else:
        task = "0x" + secrets.token_hex(32)
        guardian = _guardian_config(workdir, task, owner.address, broker, chain)
        top["task"] = task
        tables["guardians"] = {GUARDIAN: load_account(guardian.parent / "guardian.key").address}
        joining = subprocess.Popen(
            [sys.executable, "-m", "truscl.cli", "--log-level", "INFO",
             "--log-format", config.log_format, "guardian", "init", "--config", str(guardian)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "logs" / "guardian-init.log").open("ab"),
        )  # fmt: skip
    (folder / "owner.toml").write_text(render_toml(top, tables))
    try:
        spec = init_task(OwnerConfig.load(folder / "owner.toml"))
    except BaseException:
        if joining is not None:  # it would wait for a key generation that will not come
            stop_process(joining, STOP_TIMEOUT_S)
        raise
    if joining is not None and joining.wait(STOP_TIMEOUT_S) != 0:
        log_text = (workdir / "logs" / "guardian-init.log").read_text(errors="replace")
        raise DemoFailed(f"guardian init failed:\n{log_text[-2000:]}")
    return spec


def _guardian_config(
    workdir: Path, task: str, owner: str, broker: Provisioned, chain: dict[str, str]
) -> Path:
    """The key guardian's folder: its key (it sends no transaction: no gas) and guardian.toml."""
    folder = workdir / GUARDIAN
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "guardian.key").exists():
        write_secret(folder / "guardian.key", bytes(Account.create().key))
    (folder / "guardian.toml").write_text(
        render_toml(
            {"task": task, "owner": owner},
            {
                "guardian": {"name": GUARDIAN, "key": "guardian.key", "state": "state"},
                "broker": broker_table(broker.settings(GUARDIAN)),
                "chain": chain,
            },
        )
    )
    return folder / "guardian.toml"


def _start_services(
    config: DemoConfig,
    data: DemoData,
    workdir: Path,
    spec: TaskSpec,
    contract: str,
    broker: Provisioned,
    rpc: str,
) -> list[Role]:
    logs = workdir / "logs"
    chain = {"rpc": rpc, "contract": contract}
    aggregator_toml = workdir / "aggregator" / "aggregator.toml"
    aggregator_port = free_port()
    owner_toml = workdir / "owner" / "owner.toml"
    owner_metrics = OwnerConfig.load(owner_toml).metrics
    aggregator_toml.write_text(
        render_toml(
            {"task": spec.task, "expected_devices": config.devices},
            {
                "aggregator": {"key": "aggregator.key", "archive": "archive"},
                "broker": broker_table(broker.settings("aggregator")),
                "chain": chain,
                "metrics": {"port": aggregator_port},
            },
        )
    )
    roles = [
        Role("owner", ["owner", "run", "--config", str(owner_toml)], logs / "owner.log",
             metrics_port=owner_metrics.port if owner_metrics else None),
        Role("aggregator", ["aggregator", "run", "--config", str(aggregator_toml)],
             logs / "aggregator.log", metrics_port=aggregator_port),
    ]  # fmt: skip
    if spec.key_holders:
        guardian_toml = workdir / GUARDIAN / "guardian.toml"
        roles.append(
            Role(GUARDIAN, ["guardian", "run", "--config", str(guardian_toml)],
                 logs / f"{GUARDIAN}.log")
        )  # fmt: skip
    # The servers first, and the devices once they are connected (subscribed): a guardian
    # still starting when a fast first round closes would miss its aggregate, which is not
    # retained (deploy.md, "What is not there yet").
    starting = time.monotonic() + STARTUP_TIMEOUT_S
    for role in roles:
        role.start(config.log_format)
    for role in roles:
        role.wait_ready(starting)
    devices = []
    configs = []
    for index in range(config.devices):
        folder = workdir / "devices" / str(index)
        identity = broker.settings(load_account(folder / "device.key").address.lower())
        device = provision_agent(
            folder,
            broker=replace(identity, keepalive=keepalive(config.devices)),
            rpc=rpc,
            contract=contract,
            task=spec.task,
            name=f"device-{index}",
            sensors=data.sensors(index, read_period(config.devices), spec.window),
        )
        configs.append(device.config)
    for group in _device_processes(len(configs), alone_last=config.drop_device_at is not None):
        name = f"device-{group[0]}" if len(group) == 1 else f"devices-{group[0]}-{group[-1]}"
        command = ["agent", "run"]
        port = free_port()
        for index in group:
            command += ["--config", str(configs[index])]
            with configs[index].open("a") as toml:  # one /metrics for the process's devices
                toml.write(render_toml({}, {"metrics": {"port": port}}))
        devices.append(Role(name, command, logs / f"{name}.log", metrics_port=port))
    for role in devices:
        role.start(config.log_format)
    return roles + devices


def keepalive(devices: int) -> int:
    """A device's MQTT keepalive: the default while each has a process of its own; longer
    where processes host many devices. At 1,000 devices (125 a process) the close of a round
    kept processes too busy to send a keepalive for the broker's 45 s: it dropped 672 of them
    within a minute, and their TLS reconnections stalled the next round for minutes."""
    return KEEPALIVE_S if devices <= DEVICE_PROCESSES else SHARED_KEEPALIVE_S


def read_period(devices: int) -> float:
    """Real seconds between two readings of a device: a round's worth in
    ``ROUND_SECONDS_REAL``, or slower where so many devices reading that fast would take more
    than ``SENSING_CPU`` of the machine (a thousand would want nine cores). The simulated
    sensors' cost is the simulation's, not the system's; a device starts with a full window,
    so its rounds do not wait for new readings unless some it has are invalid."""
    return max(ROUND_SECONDS_REAL / READINGS_PER_ROUND, devices * READ_CPU_S / SENSING_CPU)


def _device_processes(devices: int, alone_last: bool) -> list[list[int]]:
    """Devices by process: each its own up to ``DEVICE_PROCESSES``, then shared evenly (a
    process per device costs an interpreter and its imports each); ``alone_last`` keeps the
    last device in a process of its own, so that it can be stopped alone."""
    indices = list(range(devices))
    last = [indices.pop()] if alone_last and indices else []
    count = min(len(indices), DEVICE_PROCESSES - len(last))
    groups = [indices[i::count] for i in range(count)] if count else []
    return [g for g in groups if g] + ([last] if last else [])


def _wait_for_model(
    config: DemoConfig, chain: ChainClient, spec: TaskSpec, round_no: int, roles: list[Role]
) -> None:
    timeout = max(config.round_timeout, 4 * config.deadline)
    deadline = time.monotonic() + timeout
    services = [r for r in roles if not r.name.startswith("device")]
    while chain.model_hash(spec.task_id, round_no) is None:
        stopped = [r for r in services if not r.running()]
        if stopped:
            raise DemoFailed(f"the {stopped[0].name} stopped:\n{stopped[0].tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {r.name}\n{r.tail(5)}" for r in services)
            raise DemoFailed(f"round {round_no} did not complete within {timeout:g}s\n{tails}")
        time.sleep(POLL_S)


def _round_row(
    spec: TaskSpec,
    archive: Archive,
    workdir: Path,
    round_no: int,
    test: list[Reading],
    seconds: float,
) -> RoundRow:
    """A round as the aggregator archived it and the owner released it."""
    manifest = archive.round(spec.task, round_no)
    archived = [archive.update(ident) for ident in manifest.updates]
    updates = [update for _, update in archived]
    model_file = workdir / "owner" / "state" / "models" / f"{round_no}.model"
    params = model_from_bytes(model_file.read_bytes(), spec.n_params)
    late = sum(1 for update in updates if update.round != round_no)
    return RoundRow(
        round=round_no,
        participants=len(updates) - late,
        late=late,
        accuracy=accuracy(spec, params, test),
        epsilon=max(update.epsilon for update in updates),
        bytes=sum(len(blob) for blob, _ in archived),
        anchor_tx=manifest.anchor_tx,
        seconds=seconds,
    )


def _scrape(roles: list[Role], folder: Path) -> None:
    """Each service's metrics (and the aggregator's status page), kept for the operator."""
    folder.mkdir(parents=True, exist_ok=True)
    for role in roles:
        if role.metrics_port is None or not role.running():
            continue
        pages = {"metrics.prom": "/metrics"}
        if role.name == "aggregator":
            pages["status.html"] = "/"
        for suffix, path in pages.items():
            url = f"http://127.0.0.1:{role.metrics_port}{path}"
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    (folder / f"{role.name}.{suffix}").write_bytes(response.read())
            except OSError as exc:
                log.warning("demo: cannot read %s: %s", url, exc)


def _stop_all(roles: list[Role]) -> dict[str, int | None]:
    """Devices first, then the aggregator, then the owner: the order systemd stops them in
    when they go down together is irrelevant to correctness, but this one logs least noise."""
    return {role.name: role.stop() for role in reversed(roles)}
