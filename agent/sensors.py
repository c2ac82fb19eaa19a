"""Sensor drivers of a device: BME280 over I2C, a PIR on a GPIO pin, light and CO2 through an
MCP3008 ADC over SPI.

These are the drivers that run on a Raspberry Pi. They only talk to an I2C bus object (the
``smbus2.SMBus`` subset in ``I2cBus``) and to a gpiozero pin factory, so the simulator can hand
them simulated hardware of the same shape and the agent never knows the difference.
"""

from __future__ import annotations

import struct
import time
from contextlib import ExitStack
from dataclasses import astuple, dataclass
from types import TracebackType
from typing import Protocol, Self

import cbor2
from gpiozero import MCP3008, MotionSensor
from gpiozero.pins import Factory

from truscl.errors import SensorError

FEATURES: tuple[str, ...] = ("temperature_c", "humidity_pct", "light_lux", "co2_ppm")
"""Order of ``Reading.features()``: the model's input columns, fixed for every device."""

READING_SCHEMA = 1
"""First element of ``Reading.encode()``, so a changed layout can never collide with an old leaf."""

BME280_CHIP_ID = 0x60
REG_CALIB_TP = 0x88  # 26 bytes: dig_T1..dig_P9, a reserved byte, dig_H1
REG_CHIP_ID = 0xD0
REG_CALIB_H = 0xE1  # 7 bytes: dig_H2..dig_H6
REG_CTRL_HUM = 0xF2
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # 8 bytes: pressure (20 bit), temperature (20 bit), humidity (16 bit)

OVERSAMPLING_X1 = 0b001
MODE_SLEEP = 0b00
MODE_FORCED = 0b01
MODE_MASK = 0b11
SKIPPED_20BIT = 0x80000  # what the data registers hold when a measurement was skipped
SKIPPED_16BIT = 0x8000

MEASUREMENT_POLLS = 50
"""Polls of ctrl_meas before giving up; at x1 oversampling a measurement takes under 10 ms."""
POLL_INTERVAL_S = 0.001

# The part's operating range (datasheet table 1); outside it a value means a broken read.
TEMPERATURE_RANGE_C = (-40.0, 85.0)
PRESSURE_RANGE_HPA = (300.0, 1100.0)
HUMIDITY_RANGE_PCT = (0.0, 100.0)


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


def _div_c(numerator: int, denominator: int) -> int:
    """Integer division truncating toward zero, as C's ``/`` does in the datasheet's code."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator >= 0) == (denominator > 0) else -quotient


@dataclass(frozen=True)
class Bme280Calibration:
    """Trimming values burnt into each BME280, and the datasheet's integer compensation.

    The formulas are the datasheet's 32-bit (temperature, humidity) and 64-bit (pressure)
    integer code, transcribed literally: the integer form gives the same result on every
    platform, so two readers of the same registers always agree.
    """

    t1: int
    t2: int
    t3: int
    p1: int
    p2: int
    p3: int
    p4: int
    p5: int
    p6: int
    p7: int
    p8: int
    p9: int
    h1: int
    h2: int
    h3: int
    h4: int
    h5: int
    h6: int

    @classmethod
    def from_registers(cls, tp_block: bytes, h_block: bytes) -> Bme280Calibration:
        """Parse the 26 bytes at 0x88 and the 7 bytes at 0xE1 (datasheet table 16)."""
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack_from(
            "<HhhHhhhhhhhh", tp_block
        )
        h1 = tp_block[25]
        (h2,) = struct.unpack_from("<h", h_block, 0)
        h3 = h_block[2]
        (e4, e6, h6) = struct.unpack("<bbb", bytes((h_block[3], h_block[5], h_block[6])))
        h4 = (e4 << 4) | (h_block[4] & 0x0F)  # dig_H4 is 12 bit signed, split over E4/E5
        h5 = (e6 << 4) | (h_block[4] >> 4)  # dig_H5 likewise over E5/E6
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6)

    def t_fine(self, adc_t: int) -> int:
        """Fine temperature, the input the pressure and humidity formulas share."""
        var1 = (((adc_t >> 3) - (self.t1 << 1)) * self.t2) >> 11
        var2 = (((((adc_t >> 4) - self.t1) * ((adc_t >> 4) - self.t1)) >> 12) * self.t3) >> 14
        return var1 + var2

    @staticmethod
    def temperature_centi_c(t_fine: int) -> int:
        """Temperature in 0.01 degC."""
        return (t_fine * 5 + 128) >> 8

    def pressure_q24_8(self, adc_p: int, t_fine: int) -> int:
        """Pressure in Pa as Q24.8 (Pa * 256); 0 when the formula would divide by zero."""
        var1 = t_fine - 128000
        var2 = var1 * var1 * self.p6
        var2 = var2 + ((var1 * self.p5) << 17)
        var2 = var2 + (self.p4 << 35)
        var1 = ((var1 * var1 * self.p3) >> 8) + ((var1 * self.p2) << 12)
        var1 = (((1 << 47) + var1) * self.p1) >> 33
        if var1 == 0:
            return 0
        p = 1048576 - adc_p
        p = _div_c(((p << 31) - var2) * 3125, var1)
        var1 = (self.p9 * (p >> 13) * (p >> 13)) >> 25
        var2 = (self.p8 * p) >> 19
        return ((p + var1 + var2) >> 8) + (self.p7 << 4)

    def humidity_q22_10(self, adc_h: int, t_fine: int) -> int:
        """Relative humidity in % as Q22.10 (% * 1024), clamped to 0..100 % by the formula."""
        v = t_fine - 76800
        scaled = (((adc_h << 14) - (self.h4 << 20) - (self.h5 * v)) + 16384) >> 15
        temperature_term = (((v * self.h6) >> 10) * (((v * self.h3) >> 11) + 32768)) >> 10
        v = scaled * (((temperature_term + 2097152) * self.h2 + 8192) >> 14)
        v = v - (((((v >> 15) * (v >> 15)) >> 7) * self.h1) >> 4)
        v = min(max(v, 0), 419430400)
        return v >> 12


class Bme280:
    """Bosch BME280 temperature, pressure and humidity sensor on I2C, in forced mode.

    Forced mode (one measurement per ``read()``, then sleep) is the datasheet's recommendation
    for weather monitoring at a sample every few seconds or slower: the part draws ~0.1 uA
    between readings, and a reading is always fresh rather than up to a standby period old.
    """

    def __init__(self, bus: I2cBus, address: int = 0x76) -> None:
        self._bus = bus
        self._address = address
        chip_id = bus.read_byte_data(address, REG_CHIP_ID)
        if chip_id != BME280_CHIP_ID:
            raise SensorError(
                f"no BME280 at I2C 0x{address:02x}: chip id 0x{chip_id:02x}, expected 0x60"
            )
        self.calibration = Bme280Calibration.from_registers(
            bytes(bus.read_i2c_block_data(address, REG_CALIB_TP, 26)),
            bytes(bus.read_i2c_block_data(address, REG_CALIB_H, 7)),
        )
        # ctrl_hum only takes effect on the next write to ctrl_meas (datasheet 5.4.3).
        bus.write_byte_data(address, REG_CTRL_HUM, OVERSAMPLING_X1)
        bus.write_byte_data(address, REG_CONFIG, 0)  # no IIR filter, as for weather monitoring
        bus.write_byte_data(address, REG_CTRL_MEAS, self._ctrl_meas(MODE_SLEEP))

    @staticmethod
    def _ctrl_meas(mode: int) -> int:
        return (OVERSAMPLING_X1 << 5) | (OVERSAMPLING_X1 << 2) | mode

    def _measure(self) -> list[int]:
        """Trigger one forced measurement and return the 8 data bytes once it is done.

        The mode bits of ctrl_meas read back as forced until the part returns to sleep, which
        avoids the race of polling the status register before the conversion has started.
        """
        self._bus.write_byte_data(self._address, REG_CTRL_MEAS, self._ctrl_meas(MODE_FORCED))
        for _ in range(MEASUREMENT_POLLS):
            mode = self._bus.read_byte_data(self._address, REG_CTRL_MEAS) & MODE_MASK
            if mode == MODE_SLEEP:
                return self._bus.read_i2c_block_data(self._address, REG_DATA, 8)
            time.sleep(POLL_INTERVAL_S)
        raise SensorError(f"BME280 at 0x{self._address:02x} did not finish its measurement")

    def read(self) -> tuple[float, float, float]:
        """One measurement: (temperature in degC, pressure in hPa, relative humidity in %)."""
        data = self._measure()
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
                raise SensorError(f"BME280 {name} {value} is outside {low}..{high}")
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

    def features(self) -> tuple[float, ...]:
        """Model inputs in ``FEATURES`` order (pressure is weather, not occupancy: left out)."""
        return (self.temperature_c, self.humidity_pct, self.light_lux, self.co2_ppm)

    def label(self) -> int:
        """1 when the PIR saw motion: the occupancy label."""
        return int(self.motion)

    def encode(self) -> bytes:
        """Canonical CBOR of the schema version and every field, a Merkle leaf's preimage.

        Canonical CBOR writes each float in its shortest exact form, so the same reading gives
        the same bytes on every device and for every auditor.
        """
        return cbor2.dumps([READING_SCHEMA, *astuple(self)], canonical=True)


@dataclass(frozen=True)
class Wiring:
    """Where the sensors sit on the Pi's header; the defaults are the project's wiring."""

    pir_pin: int = 4
    light_channel: int = 0
    co2_channel: int = 1
    bme280_address: int = 0x76


@dataclass(frozen=True)
class AnalogCalibration:
    """Transfer functions of the analog sensors and of the ADC.

    Light: a photodiode with a transimpedance amplifier, linear in lux up to its rail. CO2: an
    NDIR sensor's analog output, 0.4 V at 0 ppm to 2.0 V at 5000 ppm (MH-Z19 style). ADC: the
    MCP3008 datasheet's code = 1024 * V / Vref; a code is converted back at the middle of its
    step, which halves the quantisation error.
    """

    adc_vref: float = 3.3
    volts_per_lux: float = 0.0015
    co2_zero_volts: float = 0.4
    co2_span_volts: float = 1.6
    co2_span_ppm: float = 5000.0

    def volts(self, code: int) -> float:
        return (code + 0.5) * self.adc_vref / 1024

    def lux(self, volts: float) -> float:
        return volts / self.volts_per_lux

    def co2_ppm(self, volts: float) -> float:
        return (volts - self.co2_zero_volts) * self.co2_span_ppm / self.co2_span_volts

    def volts_for_lux(self, lux: float) -> float:
        return lux * self.volts_per_lux

    def volts_for_co2(self, ppm: float) -> float:
        return self.co2_zero_volts + ppm * self.co2_span_volts / self.co2_span_ppm


DEFAULT_WIRING = Wiring()
DEFAULT_CALIBRATION = AnalogCalibration()


class SensorSuite:
    """All sensors of one device, read together into a ``Reading``.

    The suite owns ``i2c_bus`` and closes it. ``pin_factory`` is passed to every gpiozero
    device: the agent never relies on gpiozero's class-level default factory, so several
    suites (one per simulated device) can live in one process without seeing each other's pins.
    """

    def __init__(
        self,
        pin_factory: Factory,
        i2c_bus: I2cBus,
        wiring: Wiring = DEFAULT_WIRING,
        calibration: AnalogCalibration = DEFAULT_CALIBRATION,
    ) -> None:
        self._bus = i2c_bus
        self._calibration = calibration
        self._bme280 = Bme280(i2c_bus, wiring.bme280_address)
        with ExitStack() as opened:
            self._pir = opened.enter_context(
                MotionSensor(wiring.pir_pin, queue_len=1, pull_up=False, pin_factory=pin_factory)
            )
            self._light = opened.enter_context(
                MCP3008(channel=wiring.light_channel, pin_factory=pin_factory)
            )
            self._co2 = opened.enter_context(
                MCP3008(channel=wiring.co2_channel, pin_factory=pin_factory)
            )
            opened.pop_all()  # construction succeeded: the suite owns them until close()

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

        MotionSensor's queue is filled by a background thread on wall-clock time, so its
        ``motion_detected`` can lag a fresh pin level by a sample period. A PIR module already
        holds its output high for its retrigger time, so the level itself is the detection.
        """
        return bool(self._pir.pin.state)

    def read(self, timestamp: float) -> Reading:
        """Sample every sensor once; ``timestamp`` is the caller's clock (epoch seconds)."""
        temperature_c, pressure_hpa, humidity_pct = self._bme280.read()
        cal = self._calibration
        return Reading(
            timestamp=timestamp,
            temperature_c=temperature_c,
            humidity_pct=humidity_pct,
            pressure_hpa=pressure_hpa,
            light_lux=cal.lux(cal.volts(self._light.raw_value)),
            co2_ppm=cal.co2_ppm(cal.volts(self._co2.raw_value)),
            motion=self._motion(),
        )

    def close(self) -> None:
        for device in (self._light, self._co2, self._pir):
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
