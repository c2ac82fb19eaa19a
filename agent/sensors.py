"""Sensor drivers of a device: BME280 over I2C, a PIR on a GPIO pin, light and CO2 through an
MCP3008 ADC over SPI.

These are the drivers that run on a Raspberry Pi. They only talk to an I2C bus object (the
``smbus2.SMBus`` subset in ``I2cBus``) and to a gpiozero pin factory, so the simulator can hand
them simulated hardware of the same shape and the agent never knows the difference.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

import cbor2
from gpiozero import MCP3008, DigitalInputDevice
from gpiozero.pins import Factory

from truscl.agent.health import SENSORS, Fault, PlausibilityCheck, Status
from truscl.datasheets import (
    BME280_CHIP_ID,
    DEFAULT_CALIBRATION,
    DEFAULT_WIRING,
    HUMIDITY_RANGE_PCT,
    MODE_FORCED,
    MODE_MASK,
    MODE_SLEEP,
    OVERSAMPLING_X1,
    PRESSURE_RANGE_HPA,
    REG_CALIB_H,
    REG_CALIB_TP,
    REG_CHIP_ID,
    REG_CONFIG,
    REG_CTRL_HUM,
    REG_CTRL_MEAS,
    REG_DATA,
    SKIPPED_16BIT,
    SKIPPED_20BIT,
    TEMPERATURE_RANGE_C,
    AnalogCalibration,
    Bme280Calibration,
    Wiring,
)
from truscl.errors import ConfigError, SensorError

READING_SCHEMA = 1
"""First element of ``Reading.encode()``, so a changed layout can never collide with an old leaf."""

MEASUREMENT_POLLS = 50
"""Polls of ctrl_meas before giving up; at x1 oversampling a measurement takes under 10 ms."""
POLL_INTERVAL_S = 0.001
NO_ANSWER = frozenset({errno.EREMOTEIO, errno.ENXIO})
"""What Linux's I2C drivers return when no device acknowledges its address: the part is absent,
not merely a transfer that failed."""


class SensorMissing(SensorError):
    """The part is not there: no answer at its address, or another chip's id."""


class OutOfRange(SensorError):
    """A value outside the part's operating range: a corrupted read, never the room's air."""


def classify(exc: OSError) -> Status:
    """The fault an exception from a sensor read stands for."""
    if isinstance(exc, SensorMissing) or exc.errno in NO_ANSWER:
        return Status.MISSING
    if isinstance(exc, OutOfRange):
        return Status.SPIKE
    return Status.IO_ERROR


class I2cBus(Protocol):
    """The part of ``smbus2.SMBus`` the drivers use."""

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int: ...

    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None: ...

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]: ...

    def close(self) -> None: ...


class Bme280:
    """Bosch BME280 temperature, pressure and humidity sensor on I2C, in forced mode.

    Forced mode (one measurement per ``read()``, then sleep) is the datasheet's recommendation
    for weather monitoring at a sample every few seconds or slower: the part draws ~0.1 uA
    between readings, and a reading is always fresh rather than up to a standby period old.
    """

    def __init__(self, bus: I2cBus, address: int = 0x76) -> None:
        self._bus = bus
        self._address = address
        self._check_chip_id()
        self.calibration = Bme280Calibration.from_registers(
            bytes(bus.read_i2c_block_data(address, REG_CALIB_TP, 26)),
            bytes(bus.read_i2c_block_data(address, REG_CALIB_H, 7)),
        )
        # ctrl_hum only takes effect on the next write to ctrl_meas (datasheet 5.4.3).
        bus.write_byte_data(address, REG_CTRL_HUM, OVERSAMPLING_X1)
        bus.write_byte_data(address, REG_CONFIG, 0)  # no IIR filter, as for weather monitoring
        bus.write_byte_data(address, REG_CTRL_MEAS, self._ctrl_meas(MODE_SLEEP))

    def _check_chip_id(self) -> None:
        chip_id = self._bus.read_byte_data(self._address, REG_CHIP_ID)
        if chip_id != BME280_CHIP_ID:
            raise SensorMissing(
                f"no BME280 at I2C 0x{self._address:02x}: chip id 0x{chip_id:02x}, expected 0x60"
            )

    @staticmethod
    def _ctrl_meas(mode: int) -> int:
        return (OVERSAMPLING_X1 << 5) | (OVERSAMPLING_X1 << 2) | mode

    def measure(self) -> bytes:
        """Trigger one forced measurement and return the 8 raw data bytes once it is done.

        The chip id is checked first, one byte per read: a part that was swapped or answers for
        another chip is caught before its data is trusted. The mode bits of ctrl_meas read back
        as forced until the part returns to sleep, which avoids the race of polling the status
        register before the conversion has started.
        """
        self._check_chip_id()
        self._bus.write_byte_data(self._address, REG_CTRL_MEAS, self._ctrl_meas(MODE_FORCED))
        for _ in range(MEASUREMENT_POLLS):
            mode = self._bus.read_byte_data(self._address, REG_CTRL_MEAS) & MODE_MASK
            if mode == MODE_SLEEP:
                return bytes(self._bus.read_i2c_block_data(self._address, REG_DATA, 8))
            time.sleep(POLL_INTERVAL_S)
        raise SensorError(f"BME280 at 0x{self._address:02x} did not finish its measurement")

    def read(self) -> tuple[float, float, float]:
        """One measurement: (temperature in degC, pressure in hPa, relative humidity in %)."""
        return self.compensate(self.measure())

    def compensate(self, data: bytes) -> tuple[float, float, float]:
        """(degC, hPa, %) from the data bytes of ``measure``, checked against the part's range."""
        adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
        adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
        adc_h = (data[6] << 8) | data[7]
        if SKIPPED_20BIT in (adc_t, adc_p) or adc_h == SKIPPED_16BIT:
            raise SensorError("BME280 skipped a measurement (data registers hold reset values)")
        cal = self.calibration
        t_fine = cal.t_fine(adc_t)
        temperature_c = cal.temperature_centi_c(t_fine) / 100
        pressure_hpa = cal.pressure_q24_8(adc_p, t_fine) / 256 / 100
        humidity_pct = cal.humidity_q22_10(adc_h, t_fine) / 1024
        for name, value, (low, high) in (
            ("temperature", temperature_c, TEMPERATURE_RANGE_C),
            ("pressure", pressure_hpa, PRESSURE_RANGE_HPA),
            ("humidity", humidity_pct, HUMIDITY_RANGE_PCT),
        ):
            if not low <= value <= high:
                raise OutOfRange(f"BME280 {name} {value} is outside {low}..{high}")
        return temperature_c, pressure_hpa, humidity_pct


@dataclass(frozen=True)
class Reading:
    """One sample of a room, the unit of training data and of the data-contribution proof."""

    timestamp: float
    temperature_c: float
    humidity_pct: float
    pressure_hpa: float
    light_lux: float
    co2_ppm: float
    motion: bool
    faults: tuple[Fault, ...] = field(default=(), kw_only=True)
    """Why this reading cannot be trusted, per sensor; a value a sensor could not give is NaN."""

    @property
    def valid(self) -> bool:
        """True when every sensor was healthy: only valid readings are training data."""
        return not self.faults

    def label(self) -> int:
        """1 when the PIR saw motion: the occupancy label."""
        return int(self.motion)

    def encode(self) -> bytes:
        """Canonical CBOR of the schema version and every field, a Merkle leaf's preimage.

        Canonical CBOR writes each float in its shortest exact form, so the same reading gives
        the same bytes on every device and for every auditor. An invalid reading has no leaf:
        it never enters a training window, so nothing may ever commit to it.
        """
        if self.faults:
            raise ValueError(f"an invalid reading is not training data: {self.faults}")
        values = (
            self.timestamp,
            self.temperature_c,
            self.humidity_pct,
            self.pressure_hpa,
            self.light_lux,
            self.co2_ppm,
            self.motion,
        )
        return cbor2.dumps([READING_SCHEMA, *values], canonical=True)


class SensorSuite:
    """All sensors of one device, read together into a ``Reading``.

    The suite owns ``i2c_bus`` and closes it. ``pin_factory`` is passed to every gpiozero
    device: the agent never relies on gpiozero's class-level default factory, so several
    suites (one per simulated device) can live in one process without seeing each other's pins.

    ``parts`` are the sensors fitted (named as :data:`truscl.agent.health.SENSORS`; all four by
    default): a quantity of a part not fitted reads NaN without a fault (and motion as none),
    and a task whose features need it is refused by the agent.

    A failing sensor never raises out of ``read``: the reading carries the fault (see
    :mod:`truscl.agent.health`) and the other sensors are still read. A BME280 that is absent
    at start, or failed its last read, is probed and set up again on the next read, since a part
    that browned out comes back with its configuration registers reset.
    """

    def __init__(
        self,
        pin_factory: Factory,
        i2c_bus: I2cBus,
        wiring: Wiring = DEFAULT_WIRING,
        calibration: AnalogCalibration = DEFAULT_CALIBRATION,
        parts: Collection[str] = SENSORS,
    ) -> None:
        unknown = sorted(set(parts) - set(SENSORS))
        if unknown:
            raise ConfigError(f"unknown sensor {unknown[0]!r} (known: {', '.join(SENSORS)})")
        self._parts = frozenset(parts)
        self.pin_factory = pin_factory  # also drives the agent's outputs (agent.output)
        self._bus = i2c_bus
        self._address = wiring.bme280_address
        self._calibration = calibration
        self._bme280: Bme280 | None = None
        self._plausible = PlausibilityCheck()
        self._pir: DigitalInputDevice | None = None
        self._light: MCP3008 | None = None
        self._co2: MCP3008 | None = None
        with ExitStack() as opened:
            if "pir" in self._parts:
                self._pir = opened.enter_context(
                    DigitalInputDevice(wiring.pir_pin, pull_up=False, pin_factory=pin_factory)
                )
            if "light" in self._parts:
                self._light = opened.enter_context(
                    MCP3008(channel=wiring.light_channel, pin_factory=pin_factory)
                )
            if "co2" in self._parts:
                self._co2 = opened.enter_context(
                    MCP3008(channel=wiring.co2_channel, pin_factory=pin_factory)
                )
            opened.pop_all()  # construction succeeded: the suite owns them until close()

    @property
    def parts(self) -> frozenset[str]:
        """The sensors this suite reads (named as :data:`truscl.agent.health.SENSORS`): what a
        task's features may need of this device."""
        return self._parts

    @classmethod
    def on_pi(cls, wiring: Wiring = DEFAULT_WIRING) -> SensorSuite:
        """The suite on real hardware: I2C bus 1 and gpiozero's configured pin factory."""
        from gpiozero import Device
        from smbus2 import SMBus

        Device.ensure_pin_factory()
        assert Device.pin_factory is not None
        return cls(Device.pin_factory, SMBus(1), wiring)

    def _motion(self) -> bool:
        """The PIR output level now.

        A PIR module holds its output high for its retrigger time, so the level itself is the
        detection: a plain input, read when the suite reads. gpiozero's ``MotionSensor`` would
        add a thread per sensor polling the pin ten times a second into a queue (a quarter of
        a simulated device process's CPU, with a hundred devices in it) and lag a fresh level
        by a sample period.
        """
        return self._pir is not None and bool(self._pir.value)

    def _bme280_data(self) -> bytes:
        if self._bme280 is None:
            self._bme280 = Bme280(self._bus, self._address)
        try:
            return self._bme280.measure()
        except OSError:
            self._bme280 = None  # set the part up again before trusting it
            raise

    def read(self, timestamp: float) -> Reading:
        """Sample every sensor once; ``timestamp`` is the caller's clock (epoch seconds)."""
        faults: list[Fault] = []
        raw: dict[str, object] = {}
        values: dict[str, float] = {}
        nan = math.nan
        temperature_c, pressure_hpa, humidity_pct = nan, nan, nan
        try:
            if "bme280" in self._parts:
                data = self._bme280_data()
                assert self._bme280 is not None
                temperature_c, pressure_hpa, humidity_pct = self._bme280.compensate(data)
                raw["bme280"] = data
                values.update(
                    temperature_c=temperature_c,
                    pressure_hpa=pressure_hpa,
                    humidity_pct=humidity_pct,
                )
        except OSError as exc:
            faults.append(Fault("bme280", classify(exc), str(exc)))
        cal = self._calibration
        analog = {"light_lux": nan, "co2_ppm": nan}
        for sensor, quantity, adc, convert in (
            ("light", "light_lux", self._light, cal.lux),
            ("co2", "co2_ppm", self._co2, cal.co2_ppm),
        ):
            if adc is None:
                continue  # not fitted
            try:
                code = int(adc.raw_value)
            except OSError as exc:
                faults.append(Fault(sensor, classify(exc), str(exc)))
            else:
                raw[sensor] = code
                analog[quantity] = values[quantity] = convert(cal.volts(code))
        motion = self._motion()
        faults += self._plausible.check(timestamp, raw, values, motion)
        return Reading(
            timestamp=timestamp,
            temperature_c=temperature_c,
            humidity_pct=humidity_pct,
            pressure_hpa=pressure_hpa,
            light_lux=analog["light_lux"],
            co2_ppm=analog["co2_ppm"],
            motion=motion,
            faults=tuple(faults),
        )

    def close(self) -> None:
        for device in (self._light, self._co2, self._pir):
            if device is not None:
                device.close()
        self._bus.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
