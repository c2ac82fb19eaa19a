"""Recorded sensor traces replayed through the same fake hardware the simulated rooms use.

A trace is a CSV file: a timestamp column and one column per quantity, and optionally a column
naming the device that recorded each row. A small TOML file beside it (``FILE.toml`` for
``FILE.csv``) maps the columns to quantities and says their units::

    [timestamp]
    column = "date"
    format = "iso8601"   # or "epoch" (seconds, the default); ISO without an offset is UTC

    [temperature]
    column = "Temperature"
    unit = "C"           # C, F or K
    [humidity]
    column = "Humidity"  # unit "%" (the default)
    [pressure]           # optional: the standard atmosphere when absent
    column = "Pressure"
    unit = "hPa"         # hPa, Pa or kPa
    [light]
    column = "Light"     # unit "lux"
    [co2]
    column = "CO2"       # unit "ppm"
    [motion]
    column = "Occupancy"
    unit = "0/1"         # or "count": a number of people, motion when above zero
    [device]             # optional: the column naming the device that recorded the row
    column = "room"

Rows are replayed by setting the fake parts' physical quantities (:class:`FakeHardware`), so the
agent's real drivers read them back quantised as real hardware would, and a value beyond a part's
range becomes the fault the part would give (see :mod:`truscl.agent.health`). A row that cannot
be read (a missing or non-numeric cell, a bad timestamp) is logged and skipped, and counted; a
missing column or timestamps that go back (per device) stop the trace with a :class:`TraceError`.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from truscl.agent.sensors import Reading, SensorSuite
from truscl.config import TomlReader, render_toml
from truscl.datasheets import (
    DEFAULT_CALIBRATION,
    DEFAULT_WIRING,
    HUMIDITY_RANGE_PCT,
    PRESSURE_RANGE_HPA,
    TEMPERATURE_RANGE_C,
    Wiring,
)
from truscl.errors import ConfigError, TrusclError
from truscl.sim.hardware import Environment, FakeHardware, SimulatedDevice

log = logging.getLogger(__name__)

STANDARD_PRESSURE_HPA = 1013.25
"""Pressure put on the BME280 when a trace records none (it is not a model input)."""
LOGGED_BAD_ROWS = 10
"""Bad rows logged one by one; beyond these only their count is."""

UNITS: dict[str, dict[str, Callable[[float], float]]] = {
    "temperature": {
        "C": lambda v: v, "F": lambda v: (v - 32.0) * 5.0 / 9.0, "K": lambda v: v - 273.15
    },
    "humidity": {"%": lambda v: v},
    "pressure": {"hPa": lambda v: v, "Pa": lambda v: v / 100.0, "kPa": lambda v: v * 10.0},
    "light": {"lux": lambda v: v},
    "co2": {"ppm": lambda v: v},
    "motion": {"0/1": lambda v: v, "count": lambda v: v},
}  # fmt: skip
"""Each quantity a map may name, its units and their conversion to the part's unit."""
REQUIRED = ("temperature", "humidity", "light", "co2", "motion")
TIMESTAMP_FORMATS = ("epoch", "iso8601")
PHYSICAL_RANGES = {
    "temperature": TEMPERATURE_RANGE_C,
    "humidity": HUMIDITY_RANGE_PCT,
    "pressure": PRESSURE_RANGE_HPA,
    "light": (0.0, DEFAULT_CALIBRATION.lux(DEFAULT_CALIBRATION.adc_vref)),
    "co2": (0.0, DEFAULT_CALIBRATION.co2_span_ppm),
}
"""What each part measures; a trace's value beyond it reaches the drivers as the part shows it."""


class TraceError(TrusclError, ValueError):
    """A trace or its map cannot be replayed: a missing column, unsorted rows, no usable row."""


@dataclass(frozen=True)
class TraceMap:
    """Which CSV column holds which quantity, in which unit (the TOML beside a trace)."""

    timestamp: str
    timestamp_format: str
    columns: dict[str, tuple[str, str]]  # quantity -> (column, unit)
    device: str | None = None
    source: str = "map"

    @classmethod
    def load(cls, path: Path) -> TraceMap:
        reader = TomlReader.load(path)
        stamp = reader.table("timestamp")
        timestamp = reader.take(stamp, "timestamp.column", str)
        fmt = reader.take(stamp, "timestamp.format", str, "epoch")
        if fmt not in TIMESTAMP_FORMATS:
            raise reader.fail(f"timestamp.format must be one of {', '.join(TIMESTAMP_FORMATS)}")
        columns = {}
        for quantity, units in UNITS.items():
            if quantity not in reader.data:
                if quantity in REQUIRED:
                    raise reader.fail(f"[{quantity}] is required (a column and its unit)")
                continue
            table = reader.table(quantity)
            column = reader.take(table, f"{quantity}.column", str)
            unit = reader.take(table, f"{quantity}.unit", str, next(iter(units)))
            if unit not in units:
                raise reader.fail(f"{quantity}.unit must be one of {', '.join(units)}")
            columns[quantity] = (column, unit)
        device = reader.take(reader.table("device"), "device.column", str, None)
        reader.no_leftovers()
        return cls(timestamp, fmt, columns, device, str(path))

    def write(self, path: Path) -> None:
        tables: dict[str, dict[str, Any]] = {
            "timestamp": {"column": self.timestamp, "format": self.timestamp_format}
        }
        for quantity, (column, unit) in self.columns.items():
            tables[quantity] = {"column": column, "unit": unit}
        if self.device is not None:
            tables["device"] = {"column": self.device}
        path.write_text(render_toml({}, tables))


def map_beside(csv_path: Path) -> Path:
    """Where a trace's map is unless given: ``FILE.toml`` beside ``FILE.csv``."""
    return csv_path.with_suffix(".toml")


@dataclass(frozen=True)
class Sample:
    """One row of a trace in the parts' units, and where it came from."""

    timestamp: float
    environment: Environment
    device: str | None
    line: int

    @property
    def day(self) -> str:
        """The calendar day (UTC, ISO format) the row was recorded on."""
        return datetime.fromtimestamp(self.timestamp, UTC).date().isoformat()


def _timestamp(text: str, fmt: str) -> float:
    if fmt == "epoch":
        return _number(text)
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Trace:
    """The usable rows of a trace file, in file order, and how many rows were skipped."""

    samples: tuple[Sample, ...]
    source: str
    skipped: int = 0

    @classmethod
    def load(cls, path: Path, mapping: TraceMap | Path | None = None) -> Trace:
        """Read ``path`` with ``mapping`` (a map file; default :func:`map_beside`)."""
        path = Path(path)
        if not isinstance(mapping, TraceMap):
            try:
                mapping = TraceMap.load(mapping or map_beside(path))
            except ConfigError as exc:
                raise TraceError(f"{path}: no usable column map: {exc}") from None
        try:
            with path.open(newline="") as file:
                return cls.read(file, mapping, str(path))
        except OSError as exc:
            raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not a text CSV file: {exc}") from None

    @classmethod
    def read(cls, lines: Iterable[str], mapping: TraceMap, source: str) -> Trace:
        rows = csv.reader(lines)
        header = [name.strip() for name in next(rows, [])]
        wanted = {"timestamp.column": mapping.timestamp}
        wanted |= {f"{q}.column": column for q, (column, _) in mapping.columns.items()}
        if mapping.device is not None:
            wanted["device.column"] = mapping.device
        for key, column in wanted.items():
            if column not in header:
                raise TraceError(
                    f"{source}: no column {column!r} ({key} in {mapping.source}); "
                    f"its columns are {', '.join(map(repr, header)) or 'none'}"
                )
        index = {name: header.index(name) for name in wanted.values()}
        samples: list[Sample] = []
        last: dict[str | None, Sample] = {}
        skipped = 0
        for fields in rows:
            if not any(field.strip() for field in fields):
                continue  # blank line
            try:
                sample = _sample(fields, index, mapping, rows.line_num)
            except (ValueError, IndexError) as exc:
                skipped += 1
                if skipped <= LOGGED_BAD_ROWS:
                    log.warning("%s line %d skipped: %s", source, rows.line_num, exc)
                continue
            before = last.get(sample.device)
            if before is not None and sample.timestamp <= before.timestamp:
                of = "" if sample.device is None else f" of device {sample.device!r}"
                raise TraceError(
                    f"{source} line {sample.line}: timestamp {sample.timestamp:.0f}{of} is not "
                    f"after line {before.line}'s ({before.timestamp:.0f}): a trace must be "
                    "sorted by time"
                )
            last[sample.device] = sample
            samples.append(sample)
        if skipped:
            log.warning("%s: %d bad row(s) skipped, %d kept", source, skipped, len(samples))
        if not samples:
            raise TraceError(f"{source}: no usable row")
        trace = cls(tuple(samples), source, skipped)
        trace._warn_out_of_range()
        return trace

    def select(self, device: str | None = None, days: Iterable[str] | None = None) -> Trace:
        """The rows of one ``device`` (all when None), on ``days`` (all when None)."""
        wanted = None if days is None else set(days)
        chosen = tuple(
            s
            for s in self.samples
            if (device is None or s.device == device) and (wanted is None or s.day in wanted)
        )
        if not chosen:
            raise TraceError(f"{self.source}: no row of device {device!r} on days {days}")
        return replace(self, samples=chosen)

    def days(self) -> list[str]:
        return sorted({s.day for s in self.samples})

    def devices(self) -> list[str]:
        return sorted({s.device for s in self.samples if s.device is not None})

    def spacing(self) -> float:
        """The typical time between two rows (the median gap), in seconds."""
        gaps = [
            b.timestamp - a.timestamp for a, b in zip(self.samples, self.samples[1:], strict=False)
        ]
        positive = [gap for gap in gaps if gap > 0]
        if not positive:
            raise TraceError(f"{self.source}: a replay needs at least two rows of one device")
        return statistics.median(positive)

    def _warn_out_of_range(self) -> None:
        """Log how many values lie beyond what the parts can measure: they are replayed as
        they are, and the drivers see them as the part would show them."""
        outside: dict[str, int] = {}
        for sample in self.samples:
            env = sample.environment
            for quantity, value in (
                ("temperature", env.temperature_c),
                ("humidity", env.humidity_pct),
                ("pressure", env.pressure_hpa),
                ("light", env.light_lux),
                ("co2", env.co2_ppm),
            ):
                low, high = PHYSICAL_RANGES[quantity]
                if not low <= value <= high:
                    outside[quantity] = outside.get(quantity, 0) + 1
        if outside:
            counts = ", ".join(f"{n} {quantity}" for quantity, n in sorted(outside.items()))
            log.warning(
                "%s: values beyond what the sensors are rated for (%s), replayed as they are: "
                "the drivers see what the parts would show (a fault, or a value at a limit)",
                self.source,
                counts,
            )


def _sample(fields: list[str], index: dict[str, int], mapping: TraceMap, line: int) -> Sample:
    def value(quantity: str) -> float:
        column, unit = mapping.columns[quantity]
        text = fields[index[column]]
        try:
            return UNITS[quantity][unit](_number(text))
        except ValueError:
            raise ValueError(f"{column} {text!r} is not a number") from None

    stamp = fields[index[mapping.timestamp]]
    try:
        timestamp = _timestamp(stamp, mapping.timestamp_format)
    except ValueError:
        raise ValueError(
            f"{mapping.timestamp} {stamp!r} is not a {mapping.timestamp_format} timestamp"
        ) from None
    motion = value("motion")
    if mapping.columns["motion"][1] == "0/1" and motion not in (0.0, 1.0):
        raise ValueError(f"{mapping.columns['motion'][0]} {motion:g} is neither 0 nor 1")
    if motion < 0:
        raise ValueError(f"{mapping.columns['motion'][0]} {motion:g} is a negative count")
    environment = Environment(
        temperature_c=value("temperature"),
        pressure_hpa=value("pressure") if "pressure" in mapping.columns else STANDARD_PRESSURE_HPA,
        humidity_pct=value("humidity"),
        light_lux=value("light"),
        co2_ppm=value("co2"),
        motion=motion > 0,
    )
    device = None if mapping.device is None else fields[index[mapping.device]].strip()
    if device == "":
        raise ValueError(f"{mapping.device} is empty")
    return Sample(timestamp, environment, device, line)


class TracePlayer:
    """Puts a trace's rows on a device's fake hardware one by one, in simulated time.

    At the end of the rows it starts again from the first, every timestamp shifted past the
    last one (by the trace's span and one spacing), as a device that lives the same days again:
    a service keeps sensing as long as it runs. Each wrap is logged.
    """

    def __init__(self, trace: Trace, hardware: FakeHardware) -> None:
        if len(trace.devices()) > 1:
            raise TraceError(
                f"{trace.source} holds the rows of {len(trace.devices())} devices: a device "
                "replays one (sensors.trace_device)"
            )
        self.trace = trace
        self.hardware = hardware
        self.spacing = trace.spacing()
        self._next = 0
        self._offset = 0.0

    def advance(self) -> float:
        """Expose the next row; its (shifted) timestamp, for stamping the reading."""
        samples = self.trace.samples
        if self._next == len(samples):
            self._next = 0
            self._offset += samples[-1].timestamp - samples[0].timestamp + self.spacing
            log.info(
                "%s: all %d rows replayed; again from the first", self.trace.source, len(samples)
            )
        sample = samples[self._next]
        self._next += 1
        self.hardware.expose(sample.environment)
        return sample.timestamp + self._offset


def replay(trace: Trace, wiring: Wiring = DEFAULT_WIRING) -> list[Reading]:
    """Every row of ``trace`` once, in file order, as the drivers of the device that recorded it
    read it (each source on hardware of its own; faulty readings included)."""
    readings: dict[int, Reading] = {}
    sources: list[str | None] = [*trace.devices()] or [None]
    for source in sources:
        hardware = FakeHardware(wiring)
        with SensorSuite(hardware.pin_factory, hardware.i2c_bus, wiring) as suite:
            for sample in trace.samples:
                if sample.device == source:
                    hardware.expose(sample.environment)
                    readings[sample.line] = suite.read(sample.timestamp)
    return [readings[sample.line] for sample in trace.samples]


QUANTITY_COLUMNS = {
    "temperature": "temperature_c",
    "humidity": "humidity_pct",
    "pressure": "pressure_hpa",
    "light": "light_lux",
    "co2": "co2_ppm",
    "motion": "motion",
}
MEASURED = [column for column in QUANTITY_COLUMNS.values() if column != "motion"]
UNIT_OF = {"temperature": "C", "humidity": "%", "pressure": "hPa", "light": "lux", "co2": "ppm"}


def record(path: Path, devices: Sequence[SimulatedDevice], count: int, interval: float) -> TraceMap:
    """Write what ``devices`` expose over ``count`` steps of ``interval`` seconds as a trace
    (epoch seconds, a ``device`` column named after each room) and its map beside it.

    A trace to try replay and ``truscl demo --data`` on without recorded data, and what the
    tests replay.
    """
    mapping = TraceMap(
        timestamp="timestamp",
        timestamp_format="epoch",
        columns={q: (column, UNIT_OF.get(q, "0/1")) for q, column in QUANTITY_COLUMNS.items()},
        device="device",
    )
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["timestamp", "device", *QUANTITY_COLUMNS.values()])
        for device in devices:
            for _ in range(count):
                device.step(interval)
                env = device.environment
                assert env is not None
                writer.writerow(
                    [
                        repr(device.now),
                        device.name,
                        *(
                            repr(getattr(env, c))
                            for c in QUANTITY_COLUMNS.values()
                            if c != "motion"
                        ),
                        int(env.motion),
                    ]
                )
    mapping.write(map_beside(path))
    return mapping
