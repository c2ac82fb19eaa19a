"""Where the demo's devices get their data: simulated rooms (the default), or a recorded trace
(``truscl demo --data FILE.csv``) split across the devices.

Either way each device reads its data through the agent's real drivers (the ``simulated`` or
``trace`` hardware backend), the held-out test set is read through the same drivers, and the
centralised baseline is trained on every device's training data pooled.

A trace is split by calendar day (``day``, the default: days dealt round-robin to the devices,
so each device sees other days, non-IID) or by its device column (``device-column``: one device
per distinct value). The held-out data is the ``--test`` file, read with the same column map;
without it, the last calendar day of each source (of the file, when it has no device column)
is held out and never replayed by a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from truscl.agent.sensors import Reading
from truscl.demo.common import (
    READING_INTERVAL_S,
    READINGS_PER_ROUND,
    DemoConfig,
    evaluation_note,
    evaluation_rooms,
    sensed_readings,
    test_set,
)
from truscl.sim.fleet import MONDAY_2024_01_08
from truscl.sim.hardware import FakeHardware
from truscl.sim.rooms import make_rooms
from truscl.sim.trace import Trace, TraceError, TraceMap, TracePlayer, map_beside, replay

SPLITS = ("day", "device-column")


class DemoData(Protocol):
    """What the demo needs from its data, whatever the source."""

    @property
    def devices(self) -> int: ...

    @property
    def most_readings(self) -> int | None:
        """The most readings one device has before its data repeats (None: no limit); the
        task's window is capped at it."""
        ...

    @property
    def note(self) -> str:
        """A line for the demo's output on where the data comes from ("": the default)."""
        ...

    def sensors(self, index: int, read_period: float, window: int) -> dict[str, Any]:
        """The ``[sensors]`` table of device ``index``, reading once every ``read_period`` real
        seconds, with a task's ``window`` of readings already taken."""
        ...

    def test_set(self) -> list[Reading]: ...

    def pooled(self, rounds: int, window: int) -> list[Reading]:
        """Every device's training readings of a run of ``rounds``, for the baseline."""
        ...


def demo_data(config: DemoConfig) -> DemoData:
    if config.data is None:
        return SimulatedRooms(config.devices, config.seed)
    return recorded_trace(config)


def recorded_trace(config: DemoConfig) -> RecordedTrace:
    """``config.data`` split as the demo's options say."""
    assert config.data is not None
    return RecordedTrace.split(
        config.data, config.split_by, config.devices, config.test, config.trace_map
    )


class SimulatedRooms:
    """One simulated room per device, starting on a Monday with three days of readings behind
    it; the test set is a later week of the same rooms (of at most ``EVALUATION_ROOMS`` of
    them, :func:`evaluation_rooms`), and the baseline pools those rooms' devices' readings.
    Each device simulates its own past, in its own process."""

    most_readings = None

    def __init__(self, devices: int, seed: int) -> None:
        self.devices = devices
        self.seed = seed
        self.profiles = make_rooms(devices, seed)
        self.evaluated = evaluation_rooms(devices, seed)
        self.note = evaluation_note(devices, seed)

    def sensors(self, index: int, read_period: float, window: int) -> dict[str, Any]:
        return {
            "hardware": "simulated",
            "interval": READING_INTERVAL_S,
            "room": index,
            "seed": self.seed,
            "time_scale": READING_INTERVAL_S / read_period,
            "start": MONDAY_2024_01_08,
            "history": window,
        }

    def test_set(self) -> list[Reading]:
        return test_set(self.profiles, self.seed, self.evaluated)

    def pooled(self, rounds: int, window: int) -> list[Reading]:
        """The readings the evaluated rooms' devices sensed over the task, replayed from the
        same rooms and seeds as the ``simulated`` backend (the devices' own copies never leave
        them)."""
        count = window + rounds * READINGS_PER_ROUND
        return [
            reading
            for index in self.evaluated
            for reading in sensed_readings(self.profiles[index], index, self.seed, count)
        ]


@dataclass(frozen=True)
class Part:
    """The rows one device replays: those of ``device`` (all when None) on ``days``."""

    device: str | None
    days: tuple[str, ...]
    trace: Trace


@dataclass(frozen=True)
class RecordedTrace:
    """A recorded trace dealt to the devices, and the held-out trace to evaluate on."""

    path: Path
    map_path: Path
    parts: tuple[Part, ...]
    test: Trace
    note: str

    @property
    def devices(self) -> int:
        return len(self.parts)

    @property
    def most_readings(self) -> int:
        """The shortest device's part: a longer window would hold rows read twice."""
        return min(len(part.trace.samples) for part in self.parts)

    @classmethod
    def split(
        cls,
        path: Path,
        split_by: str,
        devices: int,
        test_path: Path | None = None,
        map_path: Path | None = None,
    ) -> RecordedTrace:
        """Read ``path`` with ``map_path`` (default: the map beside it) and deal it to
        ``devices`` devices (``day``) or to one device per source (``device-column``)."""
        if split_by not in SPLITS:
            raise TraceError(f"--split-by must be one of {', '.join(SPLITS)}, not {split_by!r}")
        path = path.resolve()
        map_path = (map_path or map_beside(path)).resolve()
        mapping = TraceMap.load(map_path)
        trace = Trace.load(path, mapping)
        sources: list[str | None] = list(trace.devices()) or [None]
        if test_path is None:
            # The last day of each source is held out; the rest is what devices replay.
            held = {source: trace.select(source).days()[-1] for source in sources}
            if any(len(trace.select(source).days()) < 2 for source in sources):
                raise TraceError(
                    f"{path}: holding out the last day needs at least two days of each source; "
                    "give a --test file"
                )
            test = Trace(tuple(s for s in trace.samples if s.day == held[s.device]), trace.source)
            train = Trace(tuple(s for s in trace.samples if s.day != held[s.device]), trace.source)
            last = ", ".join(sorted(set(held.values())))
            held_out = f"held out: the last day of each source ({last}), as no --test was given"
        else:
            test = Trace.load(test_path, mapping)
            train = trace
            held_out = f"held out: {test_path}"
        if split_by == "day":
            if len(sources) > 1:
                raise TraceError(
                    f"{path} holds {len(sources)} devices' rows (column {mapping.device!r}): "
                    "split it with --split-by device-column"
                )
            days = train.days()
            if len(days) < devices:
                raise TraceError(f"{path}: {len(days)} day(s) cannot be dealt to {devices} devices")
            parts = [
                Part(None, tuple(days[i::devices]), train.select(days=days[i::devices]))
                for i in range(devices)
            ]
            how = f"{len(days)} days dealt round-robin to {devices} devices"
        else:
            if mapping.device is None:
                raise TraceError(f"{map_path} maps no [device] column to split by")
            parts = []
            for source in sources:
                mine = train.select(source)
                parts.append(Part(source, tuple(mine.days()), mine))
            how = f"one device per value of column {mapping.device!r} ({len(parts)} devices)"
        for part in parts:
            part.trace.spacing()  # a part a device could not replay fails here, not in a device
        note = f"trace {path}: {len(train.samples)} rows, {how}; {held_out}"
        return cls(path, map_path, tuple(parts), test, note)

    def sensors(self, index: int, read_period: float, window: int) -> dict[str, Any]:
        part = self.parts[index]
        spacing = part.trace.spacing()
        return {
            "hardware": "trace",
            "trace": self.path,
            "trace_map": self.map_path,
            "trace_device": part.device,
            "trace_days": list(part.days),
            "interval": spacing,
            "time_scale": spacing / read_period,
            "history": window,
        }

    def player(self, index: int) -> TracePlayer:
        """Device ``index``'s part on fake hardware of its own, for a device in this process."""
        return TracePlayer(self.parts[index].trace, FakeHardware())

    def test_set(self) -> list[Reading]:
        """The held-out rows as the drivers read them (valid readings only)."""
        return [reading for reading in replay(self.test) if reading.valid]

    def pooled(self, rounds: int, window: int) -> list[Reading]:
        """Every row of every device's part, as the drivers read them (valid readings only)."""
        parts = (replay(part.trace) for part in self.parts)
        return [reading for readings in parts for reading in readings if reading.valid]
