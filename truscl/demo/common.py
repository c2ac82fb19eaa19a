"""What both ways of running the demo share: its terms, its simulated rooms, the held-out test
set, the centralised baseline and the summary it prints and writes."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from truscl.agent.sensors import Reading, SensorSuite
from truscl.chain import ChainClient
from truscl.config import read_toml, render_toml
from truscl.errors import TrusclError
from truscl.learning import FeatureScaler, train_centralised
from truscl.learning.features import DEFAULT_FEATURES
from truscl.privacy.accounting import pld_epsilon
from truscl.privacy.ckks import DEFAULT_PROFILE
from truscl.report import write_report
from truscl.server.archive import Archive
from truscl.server.figures import TaskFigureReader, model_accuracy
from truscl.sim.fleet import MONDAY_2024_01_08
from truscl.sim.hardware import SimulatedDevice
from truscl.sim.rooms import Room, RoomProfile
from truscl.task import DpTerms, TaskSpec, load_task_file

READING_INTERVAL_S = 300.0  # one reading every five minutes
READINGS_PER_ROUND = 72  # six hours of new readings per round
WINDOW = 864  # a device trains on its last three days
TEST_DAYS = 7
EVALUATION_ROOMS = 20  # the most rooms whose held-out week the demo evaluates on
# Physical ranges of the sensors (low, high), known to the owner before any data exists.
SENSOR_RANGES = ((15.0, 30.0), (20.0, 70.0), (0.0, 1000.0), (400.0, 2000.0))


class DemoFailed(TrusclError, RuntimeError):
    """A round did not complete in time, or a role stopped."""


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 5
    rounds: int = 10
    seed: int = 7
    max_message: int = 128 * 1024
    workdir: Path | None = None
    drop_device_at: int | None = None  # stop the last device before this round
    round_seconds: float | None = None  # default: 20 s, and 0.8 s a device beyond 25
    round_timeout: float = 120.0
    dp: DpTerms = field(default_factory=DpTerms)
    rpc: str | None = None  # a development node to use instead of starting anvil
    in_process: bool = False  # every role in this process, on the in-process EVM (or --rpc)
    he_mode: str = "threshold"  # the owner and one key guardian share the key; or "single-key"
    log_format: str = "text"  # the services' logs: text, or json (one object per line)
    task_file: Path | None = None  # what to learn (features, model, DP terms...); None: occupancy
    data: Path | None = None  # a recorded trace (CSV) to split across the devices
    split_by: str = "day"  # how: "day" or "device-column"
    test: Path | None = None  # the held-out trace (default: the last day of --data)
    trace_map: Path | None = None  # the traces' column map (default: FILE.toml beside --data)

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(0.6 * self.devices))

    @property
    def deadline(self) -> float:
        """The round deadline. A round closes as soon as every device is in, so a longer one
        costs nothing while all goes well; many devices sharing two cores need it."""
        if self.round_seconds is not None:
            return self.round_seconds
        return max(20.0, 0.8 * self.devices)


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


def task_toml(config: DemoConfig, most_readings: int | None = None) -> str:
    """The demo's task file: ``config.task_file`` (or the occupancy task on the sensors' ranges
    and ``config.dp``), with the run's shape (rounds, quorum, deadline, message size) set by
    the demo's options. ``most_readings`` caps the window (and ``min_readings``) where the data
    holds fewer readings per device (a recorded trace's shortest part)."""
    shape = {
        "rounds": config.rounds,
        "quorum": config.quorum,
        "round_seconds": config.deadline,
        "max_message": config.max_message,
    }
    if config.task_file is None:
        ranges = {name: list(r) for name, r in zip(DEFAULT_FEATURES, SENSOR_RANGES, strict=True)}
        top: dict[str, Any] = {"window": WINDOW}
        tables: dict[str, Any] = {"ranges": ranges, "dp": asdict(config.dp)}
    else:
        data = read_toml(config.task_file)
        top = {key: value for key, value in data.items() if not isinstance(value, dict)}
        tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    if most_readings is not None:
        top["window"] = min(top.get("window", WINDOW), most_readings)
        if "min_readings" in top:
            top["min_readings"] = min(top["min_readings"], most_readings)
    return render_toml({**top, **shape}, tables)


def demo_spec(
    config: DemoConfig,
    folder: Path,
    task: str,
    context_hash: str,
    most_readings: int | None = None,
) -> TaskSpec:
    """The spec ``owner init`` makes of :func:`task_toml` (written to ``folder``)."""
    path = folder / "task.toml"
    path.write_text(task_toml(config, most_readings))
    return load_task_file(path, task=task, context_hash=context_hash)


def evaluation_rooms(devices: int, seed: int) -> list[int]:
    """The rooms whose held-out week the demo evaluates on: every room up to
    ``EVALUATION_ROOMS``; beyond, that many drawn from ``seed`` (the same draw on every run
    with the same seed and fleet), in order. Simulating a held-out week costs about a second a
    room, so a fleet of a thousand would otherwise wait minutes before its first round."""
    if devices <= EVALUATION_ROOMS:
        return list(range(devices))
    drawn = np.random.default_rng([seed, devices]).choice(devices, EVALUATION_ROOMS, replace=False)
    return sorted(int(index) for index in drawn)


def evaluation_note(devices: int, seed: int) -> str:
    """A line for the demo's output on what it evaluates on ("": every room, as always)."""
    rooms = evaluation_rooms(devices, seed)
    if len(rooms) == devices:
        return ""
    return (
        f"evaluation: the held-out week of {len(rooms)} of the {devices} rooms, drawn from seed "
        f"{seed} (rooms {', '.join(map(str, rooms))}); the centralised baseline pools those "
        "rooms' devices' readings"
    )


def test_set(
    profiles: list[RoomProfile], seed: int, rooms: Sequence[int] | None = None
) -> list[Reading]:
    """A held-out week from the same rooms (other days, other randomness), read through the
    same drivers; of ``rooms`` (indices into ``profiles``) only, when given."""
    readings = []
    start = MONDAY_2024_01_08 + 28 * 86400
    for index in range(len(profiles)) if rooms is None else rooms:
        room = Room(profiles[index], seed=seed * 1000 + 300 + index, start=start)
        held_out = SimulatedDevice(room, seed=seed * 1000 + 800 + index)
        with SensorSuite(held_out.pin_factory, held_out.i2c_bus) as suite:
            for _ in range(int(TEST_DAYS * 86400 / READING_INTERVAL_S)):
                held_out.step(READING_INTERVAL_S)
                readings.append(suite.read(held_out.now))
    return readings


def sensed_readings(profile: RoomProfile, index: int, seed: int, count: int) -> list[Reading]:
    """The first ``count`` readings device ``index`` of the fleet demo senses (its three days
    of history, then the rounds' new ones), replayed from the same room and seeds as its
    ``simulated`` backend: the device's own copy never leaves it."""
    room = Room(profile, seed=seed * 1000 + index, start=MONDAY_2024_01_08)
    device = SimulatedDevice(room, seed=seed * 1000 + 500 + index)
    readings = []
    with SensorSuite(device.pin_factory, device.i2c_bus) as suite:
        for _ in range(count):
            device.step(READING_INTERVAL_S)
            readings.append(suite.read(device.now))
    return readings


@dataclass(frozen=True)
class RoundRow:
    """One line of the demo's output and one entry of the summary's ``rounds``."""

    round: int
    participants: int
    accuracy: float
    epsilon: float
    bytes: int
    anchor_tx: str
    seconds: float
    late: int = 0  # updates made for the round before, counted in this one

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "participants": self.participants,
            "late": self.late,
            "accuracy": round(self.accuracy, 4),
            "epsilon": round(self.epsilon, 4),
            "bytes": self.bytes,
            "anchor_tx": self.anchor_tx,
            "seconds": round(self.seconds, 3),
        }

    def line(self, devices: int) -> str:
        return (
            f"round {self.round:3d}  participants {self.participants}/{devices}"
            + (f" +{self.late} late" if self.late else "")
            + f"  accuracy {self.accuracy:.3f}  epsilon {self.epsilon:.3f}  "
            f"bytes {self.bytes:,}  anchor {self.anchor_tx}"
        )


def accuracy(spec: TaskSpec, params: np.ndarray, test: list[Reading]) -> float:
    """The task's model with ``params`` on the held-out readings, by the task's features."""
    return spec.make_model().accuracy(params, spec.inputs(test), spec.targets(test))


def baseline_accuracy(
    spec: TaskSpec, pooled: list[Reading], test: list[Reading], initial: np.ndarray
) -> float:
    """Centralised, non-private training of the task's model, from the same model 0, on every
    device's readings pooled in one place."""
    model = spec.make_model()
    X, y = spec.inputs(pooled), spec.targets(pooled)
    params = train_centralised(model, X, y, epochs=500, lr=1.0, params=initial)
    return model.accuracy(params, spec.inputs(test), spec.targets(test))


def summarise(
    config: DemoConfig,
    rows: list[RoundRow],
    baseline: float,
    spec: TaskSpec,
    audit: dict[str, Any],
    seconds: float,
    extra: dict[str, Any],
    out: TextIO,
) -> dict[str, Any]:
    final = rows[-1].accuracy
    dp = spec.dp
    # The PLD figures for a device that took part in every round so far: the same DP events as
    # the devices' RDP figure, under the tight accountant, for each neighbouring relation. The
    # demo's devices start with a full window, so every round trains on ``window`` readings.
    rate = spec.sampling_rate_for(spec.window)
    per_round = []
    for count, row in enumerate(rows, start=1):
        steps = dp.local_steps * count
        per_round.append(
            {
                **row.as_dict(),
                "epsilon_pld": round(pld_epsilon(rate, dp.noise_multiplier, steps, dp.delta), 4),
                "epsilon_replace_one": round(
                    pld_epsilon(rate, dp.noise_multiplier, steps, dp.delta, replace_one=True),
                    4,
                ),
            }
        )
    summary: dict[str, Any] = {
        "rounds": per_round,
        "final_accuracy": round(final, 4),
        "baseline_accuracy": round(baseline, 4),
        "epsilon": round(rows[-1].epsilon, 4),
        "epsilon_pld": per_round[-1]["epsilon_pld"],
        "epsilon_replace_one": per_round[-1]["epsilon_replace_one"],
        "delta": spec.dp.delta,
        "he_mode": spec.he_mode,
        "key_holders": [name for name, _ in spec.key_holders],
        "audit": audit,
        "devices": config.devices,
        "task": spec.task,
        "seconds": round(seconds, 1),
        **extra,
    }
    holders = f" ({', '.join(summary['key_holders'])})" if spec.key_holders else ""
    print(
        f"final accuracy {final:.3f}, centralised non-private baseline {baseline:.3f} "
        f"({100 * final / baseline:.1f} %)\n"
        f"privacy: epsilon {summary['epsilon']:.3f} per device at delta {spec.dp.delta:g} "
        f"(RDP, add/remove one reading; budget {spec.dp.epsilon_budget:g}); PLD accountant "
        f"{summary['epsilon_pld']:.3f}, replace-one {summary['epsilon_replace_one']:.3f}\n"
        f"keys: {spec.he_mode}{holders}; "
        f"refused rounds: {summary.get('refused_rounds') or 'none'}\n"
        f"audit: {audit['verified']}/{audit['total']} rounds verified against the chain\n"
        f"time: {summary['seconds']} s",
        file=out,
    )
    return summary


def write_demo_report(
    config: DemoConfig,
    chain: ChainClient,
    archive: Archive,
    spec: TaskSpec,
    models: Mapping[int, np.ndarray],
    test: list[Reading],
    workdir: Path,
    note: str = "",
) -> Path:
    """``truscl report`` of the demo's task, its held-out week as the evaluation set (``note``
    says which part of it, when not all); the summary's path. With ``--workdir`` in
    ``report/`` there, beside the set (``test-set.npz``, for running the command again by
    hand); without, in a folder of its own, which outlives the temporary workdir."""
    X_test, y_test = spec.inputs(test), spec.targets(test)
    if config.workdir is None:
        out = Path(tempfile.mkdtemp(prefix="truscl-report-"))
    else:
        out = workdir / "report"
        np.savez(workdir / "test-set.npz", X=X_test, y=y_test)
    figures = TaskFigureReader(chain, archive, spec.task).read(
        model_accuracy(spec, models, X_test, y_test),
        f"of each released model on the demo's held-out week ({len(y_test)} readings)"
        + (f"; {note}" if note else ""),
    )
    return write_report(figures, out)
