"""Sensor health: which readings a device may learn from, and what its operator sees.

A sensor that fails must neither stop a device nor teach its model: a stuck, spiking, silent or
absent sensor turns a reading into a record of the fault instead of a training sample. The
plausibility rules, each with the reason for its limit, are all in this module; the datasheet
facts they rest on are in :mod:`truscl.datasheets`. The sampler keeps a :class:`HealthBook`:
one :class:`SensorHealth` per sensor, logged once per episode and written to ``sensors.json``
in the agent's state folder, where ``truscl agent status`` (and later a metrics exporter) reads
it with :func:`read_health` and :func:`describe_health`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from truscl.files import write_atomically

log = logging.getLogger(__name__)

HEALTH_FILE = "sensors.json"
HEALTH_SCHEMA = 1

SENSORS: tuple[str, ...] = ("bme280", "light", "co2", "pir")
"""What health is kept for: the BME280 (temperature, pressure, humidity from one burst read),
each ADC channel, and the PIR."""


class Status(StrEnum):
    OK = "ok"
    STUCK = "stuck"
    SPIKE = "spike"
    IO_ERROR = "io-error"
    MISSING = "missing"


FAULTS: tuple[Status, ...] = tuple(s for s in Status if s is not Status.OK)


@dataclass(frozen=True)
class Fault:
    """Why one sensor's part of one reading cannot be trusted."""

    sensor: str
    status: Status
    detail: str


# --- The rules ---------------------------------------------------------------------------------

STUCK_READS: Mapping[str, int] = {"bme280": 6, "co2": 12}
"""Consecutive reads with the same raw value after which a sensor is stuck.

BME280: the raw value is the whole 8-byte data burst. At x1 oversampling the pressure LSB is
2.6 Pa against 3.3 Pa RMS noise (datasheet table 3), so even in still air pressure alone repeats
with odds of about 1 in 5, and temperature and humidity must repeat too; six identical bursts
(30 min at 300 s) do not happen while the part converts. What they do show is a part that stopped
converting and keeps returning its last data registers.

CO2: the NDIR sensor's analog output carries +-50 ppm of noise, several 10 ppm ADC codes, so one
code repeats with odds of about 1 in 9; twelve in a row (an hour at 300 s) is a frozen output.

Light is not checked: a dark room reads code 0 all night and a windowless lamp-lit one holds a
code for hours, both correctly. The PIR holds its level by design: see ``PIR_STUCK_HIGH_S``.
"""

PIR_STUCK_HIGH_S = 24 * 3600.0
"""A PIR whose output has been high at every read for a day is stuck. A PIR module holds its
output for a retrigger time of seconds to minutes after motion, so a day of continuous high means
motion every few seconds through a whole night, which no room shows. Stuck low is not a fault
that can be told from an empty room (nor can a disconnected input, which the pull-down holds low).
"""


@dataclass(frozen=True)
class RateLimit:
    """The fastest a room can change one quantity: ``floor`` (the sensor's noise and
    quantisation, so two reads close together never alarm) plus ``per_minute`` of real change
    for every minute since the last trusted value."""

    sensor: str
    unit: str
    per_minute: float
    floor: float

    def allowed(self, seconds: float) -> float:
        return self.floor + self.per_minute * max(seconds, 0.0) / 60.0


RATE_LIMITS: Mapping[str, RateLimit] = {
    # Opening a window in winter or a heater next to the sensor moves indoor air by a few degC in
    # ten minutes; 1 degC a minute is beyond any of that (5.5 degC between reads at 300 s).
    "temperature_c": RateLimit("bme280", "degC", per_minute=1.0, floor=0.5),
    # A shower or a kettle raises relative humidity by tens of % in ten minutes; RH also falls
    # about 2 % per degC of warming. 5 % a minute (27 % between reads at 300 s) is beyond both.
    "humidity_pct": RateLimit("bme280", "%", per_minute=5.0, floor=2.0),
    # The deepest storms drop pressure by about 1 hPa an hour and a slammed door moves it by
    # tenths; 0.5 hPa a minute is 30 hPa an hour. A fixed device never changes height.
    "pressure_hpa": RateLimit("bme280", "hPa", per_minute=0.5, floor=1.0),
    # Six people in 30 m3 raise CO2 by about 60 ppm a minute; a wide-open window lowers it by a
    # few hundred ppm a minute at most. 300 ppm a minute plus the sensor's +-50 ppm noise. A
    # faster jump is not the room's air even when real (someone breathing onto the sensor).
    "co2_ppm": RateLimit("co2", "ppm", per_minute=300.0, floor=150.0),
}
"""Jumps no room can make. Light has no limit: lamps switch on and off in an instant."""

ADC_RAILS = (0, 1023)
"""MCP3008 codes at 0 V and at Vref. The CO2 sensor's output spans 0.4..2.0 V (codes 124..620 at
3.3 V), so a CO2 code at a rail is a disconnected sensor; both channels at the same rail is what
the SPI bus reads when no ADC drives MISO (pulled down, or floating high)."""


class PlausibilityCheck:
    """The stateful rules (stuck, rate, rails) for one suite of sensors, applied read by read.

    A quantity's rate is judged against the last value that was trusted, over the time since
    then: after a spike the next good read is compared with the level before it, and a real
    change that was missed (the sensor was off for an hour) becomes plausible as time passes.
    """

    def __init__(self) -> None:
        self._last_raw: dict[str, object] = {}
        self._same_reads: dict[str, int] = {}
        self._trusted: dict[str, tuple[float, float]] = {}  # quantity -> (timestamp, value)
        self._pir_high_since: float | None = None

    def check(
        self,
        timestamp: float,
        raw: Mapping[str, object],
        values: Mapping[str, float],
        motion: bool,
    ) -> list[Fault]:
        """Faults of the sensors in ``raw`` (those that answered) in this read.

        ``raw`` holds each answering sensor's raw value (the BME280's data burst, the ADC codes);
        ``values`` the quantities derived from them.
        """
        faults = [*self._rails(raw), *self._stuck(raw), *self._pir(timestamp, motion)]
        flagged = {f.sensor for f in faults}
        for quantity, limit in RATE_LIMITS.items():
            if limit.sensor in flagged or quantity not in values:
                continue
            fault = self._jump(timestamp, quantity, values[quantity], limit)
            if fault is not None:
                faults.append(fault)
                flagged.add(limit.sensor)
        for quantity, limit in RATE_LIMITS.items():
            if limit.sensor not in flagged and quantity in values:
                self._trusted[quantity] = (timestamp, values[quantity])
        return faults

    @staticmethod
    def _rails(raw: Mapping[str, object]) -> list[Fault]:
        light, co2 = raw.get("light"), raw.get("co2")
        if co2 not in ADC_RAILS:
            return []
        if light == co2:
            detail = f"MCP3008 reads {co2} on every channel: no ADC is answering"
            return [Fault("light", Status.MISSING, detail), Fault("co2", Status.MISSING, detail)]
        return [Fault("co2", Status.MISSING, f"CO2 output at ADC code {co2}: disconnected")]

    def _stuck(self, raw: Mapping[str, object]) -> list[Fault]:
        faults = []
        for sensor, limit in STUCK_READS.items():
            value = raw.get(sensor)
            if value is None or value != self._last_raw.get(sensor):
                self._same_reads[sensor] = 1
            else:
                self._same_reads[sensor] += 1
            if value is None:
                self._last_raw.pop(sensor, None)
            else:
                self._last_raw[sensor] = value
            if self._same_reads[sensor] >= limit:
                faults.append(
                    Fault(
                        sensor, Status.STUCK, f"same raw value for {self._same_reads[sensor]} reads"
                    )
                )
        return faults

    def _pir(self, timestamp: float, motion: bool) -> list[Fault]:
        if not motion:
            self._pir_high_since = None
            return []
        if self._pir_high_since is None:
            self._pir_high_since = timestamp
        held = timestamp - self._pir_high_since
        if held >= PIR_STUCK_HIGH_S:
            return [
                Fault("pir", Status.STUCK, f"output high at every read for {held / 3600:.0f} h")
            ]
        return []

    def _jump(
        self, timestamp: float, quantity: str, value: float, limit: RateLimit
    ) -> Fault | None:
        if quantity not in self._trusted:
            return None
        since, trusted = self._trusted[quantity]
        allowed = limit.allowed(timestamp - since)
        if abs(value - trusted) <= allowed:
            return None
        return Fault(
            limit.sensor,
            Status.SPIKE,
            f"{quantity} {trusted:.6g} -> {value:.6g} {limit.unit} in {timestamp - since:.0f} s "
            f"(at most {allowed:.3g})",
        )


# --- Health kept by the sampler ----------------------------------------------------------------


@dataclass
class SensorHealth:
    """One sensor's state now and its history of faults since the agent started.

    ``since`` is the timestamp (the sampler's clock) of the first read in the current status;
    ``episodes`` counts the runs of each fault, ``invalid_reads`` the reads it spoiled.
    """

    status: Status = Status.OK
    since: float | None = None
    detail: str = ""
    episodes: dict[str, int] = field(default_factory=lambda: {str(s): 0 for s in FAULTS})
    invalid_reads: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "since": self.since,
            "detail": self.detail,
            "episodes": dict(self.episodes),
            "invalid_reads": self.invalid_reads,
        }


class HealthBook:
    """Every sensor's :class:`SensorHealth`, updated read by read.

    A fault is logged when its episode starts and once more when the sensor recovers, never on
    every read: a sensor that fails for a week must not fill the Pi's SD card with log lines.
    The health file is rewritten (atomically, so a reader never sees half of it) only when
    something in it changed, so a healthy device does not write at all after its first read.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.sensors = {name: SensorHealth() for name in SENSORS}
        self.updated: float | None = None
        self._written = False

    def record(self, timestamp: float, faults: Sequence[Fault]) -> None:
        """Account for one reading taken at ``timestamp`` with ``faults``."""
        by_sensor = {f.sensor: f for f in reversed(faults)}  # the first fault of a sensor wins
        changed = not self._written
        self.updated = timestamp
        for name, health in self.sensors.items():
            if health.since is None:
                health.since = timestamp
            fault = by_sensor.get(name)
            status = fault.status if fault else Status.OK
            if fault is not None:
                health.invalid_reads += 1
                changed = True
            if status is health.status:
                continue
            if fault is None:
                log.info(
                    "sensor %s is ok again (was %s since %s)", name, health.status, health.since
                )
            else:
                health.episodes[str(status)] += 1
                log.warning("sensor %s: %s: %s", name, status, fault.detail)
            health.status, health.since = status, timestamp
            health.detail = fault.detail if fault else ""
            changed = True
        if changed:
            self._write()

    def snapshot(self) -> dict[str, Any]:
        return {
            "schema": HEALTH_SCHEMA,
            "updated": self.updated,
            "sensors": {name: health.as_dict() for name, health in self.sensors.items()},
        }

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps(self.snapshot(), indent=1).encode()
            write_atomically(self.path, data)
            self._written = True
        except OSError as exc:  # a full or read-only disk must not stop sensing
            log.warning("cannot write sensor health to %s: %s", self.path, exc)


def read_health(state_folder: Path) -> dict[str, Any]:
    """The health file in ``state_folder``, or ``{}`` when the agent has not sampled yet."""
    path = Path(state_folder) / HEALTH_FILE
    try:
        health: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return health


def describe_health(health: Mapping[str, Any]) -> list[str]:
    """Lines for a terminal, one per sensor, from what :func:`read_health` returned."""
    sensors: Mapping[str, Mapping[str, Any]] = health.get("sensors", {})
    if not sensors:
        return ["sensors   no health recorded yet"]
    lines = []
    for name, state in sensors.items():
        status = state["status"]
        since = state["since"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(since)) if since is not None else "?"
        line = f"sensor    {name:<7} {status if status == 'ok' else status.upper()} since {when}"
        if state["detail"]:
            line += f": {state['detail']}"
        past = {kind: n for kind, n in state["episodes"].items() if n}
        if past:
            episodes = ", ".join(f"{n} {kind}" for kind, n in sorted(past.items()))
            line += f" ({episodes} episode(s), {state['invalid_reads']} invalid read(s))"
        lines.append(line)
    return lines
