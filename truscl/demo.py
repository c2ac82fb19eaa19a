"""``truscl demo``: one whole task on this machine, every role talking through MQTT and the chain.

A real mosquitto broker (child process), an in-process EVM with the truscl contract, the task
owner, one aggregator and N simulated devices, each in its own threads. The harness plays the
rooms: it advances each room's clock when the device reads its sensors, and keeps a copy of
every reading only to train the centralised, non-private baseline the summary compares with.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from truscl.agent.device import DeviceAgent
from truscl.agent.sensors import Reading, SensorSuite
from truscl.broker import Mosquitto
from truscl.chain import ChainClient, DevChain, EmbeddedChain, NodeChain
from truscl.errors import TrusclError
from truscl.keyfile import load_or_create_account
from truscl.learning import FeatureScaler, LogisticModel, train_centralised
from truscl.privacy.ckks import DEFAULT_PROFILE, OwnerKeys
from truscl.server.aggregator import Aggregator, RoundStats
from truscl.server.archive import Archive
from truscl.server.audit import audit_task
from truscl.server.owner import TaskOwner
from truscl.sim.fleet import MONDAY_2024_01_08
from truscl.sim.hardware import SimulatedDevice
from truscl.sim.rooms import Room, make_rooms
from truscl.task import DpTerms, TaskSpec

log = logging.getLogger(__name__)

READING_INTERVAL_S = 300.0  # one reading every five minutes
READINGS_PER_ROUND = 72  # six hours of new readings per round
WINDOW = 864  # a device trains on its last three days
TEST_DAYS = 7
# Physical ranges of the sensors (low, high), known to the owner before any data exists.
SENSOR_RANGES = ((15.0, 30.0), (20.0, 70.0), (0.0, 1000.0), (400.0, 2000.0))


class DemoFailed(TrusclError, RuntimeError):
    """A round did not complete in time."""


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 5
    rounds: int = 10
    seed: int = 7
    max_message: int = 128 * 1024
    workdir: Path | None = None
    drop_device_at: int | None = None  # stop the last device before this round
    round_seconds: float = 20.0
    round_timeout: float = 120.0
    dp: DpTerms = field(default_factory=DpTerms)
    rpc: str | None = None  # a development node (anvil) instead of the in-process EVM

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(0.6 * self.devices))


def occupancy_spec(context_hash: str, **terms: Any) -> TaskSpec:
    """The demo's task: occupancy from the four environmental features, scaled by the sensors'
    physical ranges, under the owner's HE context; ``terms`` override the spec's defaults."""
    scaler = FeatureScaler.from_ranges(SENSOR_RANGES)
    fields: dict[str, Any] = {
        "task": "0x" + os.urandom(32).hex(),
        "rounds": 10,
        "quorum": 1,
        "he_profile": DEFAULT_PROFILE.name,
        "context_hash": context_hash,
        "feature_offsets": scaler.offset,
        "feature_scales": scaler.scale,
        "window": WINDOW,
    }
    return TaskSpec(**{**fields, **terms})


def sensor_source(
    device: SimulatedDevice, suite: SensorSuite, pooled: list[Reading]
) -> Callable[[], list[Reading]]:
    """The readings a device made since its last round, in simulated time.

    The first call returns a full window, as if the device had been sensing for days before
    the task began; each later call, the six hours of readings taken since.
    """

    def collect() -> list[Reading]:
        fresh = READINGS_PER_ROUND if pooled else WINDOW
        readings = []
        for _ in range(fresh):
            device.step(READING_INTERVAL_S)
            readings.append(suite.read(device.now))
        pooled.extend(readings)
        return readings

    return collect


def test_set(devices: list[SimulatedDevice], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A held-out week from the same rooms (other days, other randomness), read through the
    same drivers."""
    rows, labels = [], []
    start = MONDAY_2024_01_08 + 28 * 86400
    for index, device in enumerate(devices):
        room = Room(device.room.profile, seed=seed * 1000 + index, start=start)
        held_out = SimulatedDevice(room, seed=seed * 1000 + 500 + index)
        with SensorSuite(held_out.pin_factory, held_out.i2c_bus) as suite:
            for _ in range(int(TEST_DAYS * 86400 / READING_INTERVAL_S)):
                held_out.step(READING_INTERVAL_S)
                reading = suite.read(held_out.now)
                rows.append(reading.features())
                labels.append(reading.label())
    return np.array(rows), np.array(labels, dtype=np.float64)


def run_demo(config: DemoConfig, out: TextIO) -> dict[str, Any]:
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's solver chatter
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="truscl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    profiles = make_rooms(config.devices, config.seed)
    sims = [
        SimulatedDevice(Room(p, seed=config.seed * 100 + i, start=MONDAY_2024_01_08), seed=i)
        for i, p in enumerate(profiles)
    ]
    X_test, y_test = test_set(sims, config.seed)
    pooled: list[list[Reading]] = [[] for _ in sims]
    model = LogisticModel(len(SENSOR_RANGES))
    scaler = FeatureScaler.from_ranges(SENSOR_RANGES)

    chain: DevChain = NodeChain(config.rpc) if config.rpc else EmbeddedChain()
    admin = chain.new_account()
    contract = ChainClient.deploy(chain.web3(), admin, chain.lock)

    owner_account, aggregator_account = chain.new_account(), chain.new_account()
    keys = OwnerKeys.generate(DEFAULT_PROFILE)
    (workdir / "owner").mkdir(exist_ok=True)
    keys.save(workdir / "owner" / "secret-context")

    models: queue.Queue[tuple[int, np.ndarray]] = queue.Queue()
    closed: dict[int, RoundStats] = {}
    broker = Mosquitto(workdir / "broker").start()
    agents: list[DeviceAgent] = []
    suites: list[SensorSuite] = []
    owner: TaskOwner | None = None
    aggregator: Aggregator | None = None
    try:
        owner = TaskOwner(
            keys=keys,
            chain=chain.client(contract.address, owner_account),
            broker=broker.settings,
            on_model=lambda r, params: models.put((r, params)),
        )
        spec = occupancy_spec(
            owner.context_hash,
            rounds=config.rounds,
            quorum=config.quorum,
            round_seconds=config.round_seconds,
            max_message=config.max_message,
            dp=config.dp,
        )
        for index, sim in enumerate(sims):
            account = load_or_create_account(workdir / "devices" / str(index) / "device.key")
            contract.register_device(account.address)
            suite = SensorSuite(sim.pin_factory, sim.i2c_bus)
            suites.append(suite)
            agents.append(
                DeviceAgent(
                    account=account,
                    task=spec.task,
                    chain=chain.client(contract.address),
                    broker=broker.settings,
                    workdir=workdir / "devices" / str(index),
                    collect=sensor_source(sim, suite, pooled[index]),
                    name=sim.name,
                ).start()
            )
        aggregator = Aggregator(
            spec=spec,
            public_context=owner.public_context,
            chain=chain.client(contract.address, aggregator_account),
            archive=Archive(workdir / "archive"),
            broker=broker.settings,
            expected=config.devices,
            on_closed=lambda stats: closed.__setitem__(stats.round, stats),
        )
        owner.create_task(spec, aggregator_account.address, model.init_params())
        aggregator.start()
        rounds: list[dict[str, Any]] = []
        print(
            f"truscl demo: {config.devices} devices, {config.rounds} rounds, "
            f"broker 127.0.0.1:{broker.port}, contract {contract.address}",
            file=out,
        )
        _, params = models.get(timeout=config.round_timeout)  # the initial model
        round_started = time.monotonic()
        for round_no in range(1, config.rounds + 1):
            if config.drop_device_at == round_no:
                agents[-1].stop()
                print(f"  (device {agents[-1].name} stops before round {round_no})", file=out)
            try:
                released, params = models.get(timeout=config.round_timeout)
            except queue.Empty:
                raise DemoFailed(
                    f"round {round_no} did not complete within {config.round_timeout}s"
                ) from None
            stats = closed[released]
            seconds, round_started = time.monotonic() - round_started, time.monotonic()
            accuracy = model.accuracy(params, scaler.apply(X_test), y_test)
            epsilon = stats.epsilon
            row = {
                "round": released,
                "participants": stats.participants,
                "accuracy": round(accuracy, 4),
                "epsilon": round(epsilon, 4),
                "bytes": stats.bytes_in,
                "anchor_tx": stats.anchor_tx,
                "seconds": round(seconds, 3),
            }
            rounds.append(row)
            print(
                f"round {released:3d}  participants {stats.participants}/{config.devices}  "
                f"accuracy {accuracy:.3f}  epsilon {epsilon:.3f}  "
                f"bytes {stats.bytes_in:,}  anchor {stats.anchor_tx}",
                file=out,
            )
        report = audit_task(chain.client(contract.address), Archive(workdir / "archive"), spec.task)
    finally:
        for agent in agents:
            agent.stop()
        if aggregator is not None:
            aggregator.stop()
        if owner is not None:
            owner.stop()
        for suite in suites:
            suite.close()
        broker.stop()

    X_pool = np.array([r.features() for readings in pooled for r in readings])
    y_pool = np.array([r.label() for readings in pooled for r in readings], dtype=np.float64)
    baseline_params = train_centralised(model, scaler.apply(X_pool), y_pool, epochs=500, lr=1.0)
    baseline = model.accuracy(baseline_params, scaler.apply(X_test), y_test)
    final = rounds[-1]["accuracy"]
    summary: dict[str, Any] = {
        "rounds": rounds,
        "final_accuracy": final,
        "baseline_accuracy": round(baseline, 4),
        "epsilon": rounds[-1]["epsilon"],
        "delta": spec.dp.delta,
        "audit": report.as_dict(),
        "devices": config.devices,
        "chain": config.rpc or "embedded",
        "contract": contract.address,
        "task": spec.task,
        "seconds": round(time.monotonic() - started, 1),
        "workdir": str(workdir),
    }
    print(
        f"final accuracy {final:.3f}, centralised non-private baseline {baseline:.3f} "
        f"({100 * final / baseline:.1f} %)\n"
        f"privacy: epsilon {summary['epsilon']:.3f} per device at delta {spec.dp.delta:g} "
        f"(budget {spec.dp.epsilon_budget:g})\n"
        f"audit: {report.verified}/{report.total} rounds verified against the chain\n"
        f"time: {summary['seconds']} s",
        file=out,
    )
    if config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"keys, archive and broker log kept in {workdir}", file=out)
    return summary
