"""Simulated hardware of one device, behind the interfaces the real drivers use.

The agent's ``SensorSuite`` gets a gpiozero pin factory and an smbus2-like bus, exactly as on a
Pi. Here the factory is a ``MockFactory`` whose PIR pin the simulator drives and whose SPI
interface is answered bit by bit by an emulated MCP3008; the bus is a BME280 register map whose
data registers hold the raw ADC values the real part would produce for the room's air.

gpiozero 2.0.1 shares SPI interfaces and software SPI buses in a class-level registry keyed by
pin names only (``SharedMixin._instances``), and its ``SPISoftwareBus`` falls back to the
class-level default pin factory. Two simulated devices with the same wiring would then read
each other's ADC. ``SimulatedBoard`` therefore gives every factory its own SPI interface.

Each part can be broken on purpose (a stuck value, a one-off spike, I/O errors, a part that
disappears and comes back) for tests and soak runs. It breaks the way real hardware does, on the
wires: the agent's drivers see only what a broken part would show them.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from threading import RLock

import numpy as np
from gpiozero.pins import SPI
from gpiozero.pins.mock import MockFactory

from truscl.datasheets import (
    BME280_CHIP_ID,
    DEFAULT_CALIBRATION,
    DEFAULT_WIRING,
    MODE_MASK,
    MODE_SLEEP,
    REG_CALIB_H,
    REG_CALIB_TP,
    REG_CHIP_ID,
    REG_CTRL_HUM,
    REG_CTRL_MEAS,
    REG_DATA,
    SKIPPED_16BIT,
    SKIPPED_20BIT,
    AnalogCalibration,
    Bme280Calibration,
    Wiring,
)
from truscl.sim.rooms import Room

TYPICAL_CALIBRATION = Bme280Calibration(
    # Temperature and pressure: the datasheet's worked example (BMP280 datasheet 3.12).
    t1=27504, t2=26435, t3=-1000,
    p1=36477, p2=-10685, p3=3024, p4=2855, p5=140, p6=-7, p7=15500, p8=-14600, p9=6000,
    # Humidity: the datasheet gives no example; these are a production part's values.
    h1=75, h2=362, h3=0, h4=324, h5=0, h6=30,
)  # fmt: skip
SMBUS_BLOCK_MAX = 32
REG_STATUS = 0xF3
MODE_NORMAL = 0b11
SPI0_PINS = {"clock_pin": 11, "mosi_pin": 10, "miso_pin": 9, "select_pin": 8}
"""The Pi's hardware SPI0 with chip select CE0, where gpiozero's MCP3008 looks by default."""


def _calibration_registers(cal: Bme280Calibration) -> tuple[bytes, bytes]:
    """The 26 bytes at 0x88 and the 7 bytes at 0xE1 that hold ``cal`` (datasheet table 16)."""
    tp = struct.pack(
        "<HhhHhhhhhhhhBB",
        cal.t1, cal.t2, cal.t3,
        cal.p1, cal.p2, cal.p3, cal.p4, cal.p5, cal.p6, cal.p7, cal.p8, cal.p9,
        0, cal.h1,
    )  # fmt: skip
    h = struct.pack("<hB", cal.h2, cal.h3) + bytes(
        (
            (cal.h4 >> 4) & 0xFF,
            ((cal.h5 & 0x0F) << 4) | (cal.h4 & 0x0F),
            (cal.h5 >> 4) & 0xFF,
            cal.h6 & 0xFF,
        )
    )
    return tp, h


def _nearest_code(compensate: Callable[[int], int], target: float, bits: int) -> int:
    """The ``bits``-wide ADC code whose compensated value is closest to ``target``.

    Compensation is monotonic over the code range, so bisection finds the crossing; the
    nearer of the two codes around it is what a real part would most likely report.
    """
    low, high = 0, (1 << bits) - 1
    rising = compensate(high) > compensate(low)

    def below(code: int) -> bool:
        return (compensate(code) < target) == rising

    while low < high:
        middle = (low + high) // 2
        if below(middle):
            low = middle + 1
        else:
            high = middle
    candidates = {max(low - 1, 0), low}
    return min(candidates, key=lambda code: abs(compensate(code) - target))


def _adc_bits(oversampling: int) -> int:
    """Resolution of a 20-bit data register at an osrs setting: 16 bits at x1, +1 per step."""
    return 15 + min(oversampling, 5)


class FakeBme280Bus:
    """An I2C bus with one BME280 on it, compatible with the smbus2 calls the driver makes.

    The simulator sets the air with ``set_environment``; the chip converts it when the driver
    triggers a forced measurement (or at once in normal mode), as the real part samples only
    then. Oversampling settings choose the resolution of the data registers.

    Faults: ``stick`` freezes the data registers (the part stops converting but still answers),
    ``spike`` adds an offset to the next conversion only, ``fail_next`` makes the next
    transactions fail with an ``OSError``, ``disappear`` takes the part off the bus (no
    acknowledge) or puts another chip's id in its place, and ``recover`` ends every fault, after
    a power-on reset when the part had disappeared.
    """

    def __init__(
        self, address: int = DEFAULT_WIRING.bme280_address, chip_id: int = BME280_CHIP_ID
    ) -> None:
        self.address = address
        self.calibration = TYPICAL_CALIBRATION
        self._chip_id = chip_id
        self._registers = bytearray(256)
        tp, h = _calibration_registers(self.calibration)
        self._read_only = set(range(REG_CALIB_TP, REG_CALIB_TP + len(tp)))
        self._read_only |= set(range(REG_CALIB_H, REG_CALIB_H + len(h)))
        self._read_only |= {REG_CHIP_ID, REG_STATUS, *range(REG_DATA, REG_DATA + 8)}
        self._power_on_reset()
        self._environment = (20.0, 1013.25, 40.0)
        self._closed = False
        self._stuck = False
        self._spike = (0.0, 0.0, 0.0)
        self._failures = 0  # coming transactions that fail, each with ``self._error``
        self._error = errno.EIO
        self._absent = False

    def _power_on_reset(self) -> None:
        """Registers as the part comes out of reset: NVM trimming loaded, controls cleared."""
        self._registers[:] = bytes(256)
        self._registers[REG_CHIP_ID] = self._chip_id
        tp, h = _calibration_registers(self.calibration)
        self._registers[REG_CALIB_TP : REG_CALIB_TP + len(tp)] = tp
        self._registers[REG_CALIB_H : REG_CALIB_H + len(h)] = h
        self._write_data(SKIPPED_20BIT, SKIPPED_20BIT, SKIPPED_16BIT)

    def stick(self) -> None:
        """The part stops converting: measurements end as usual but the data stay as they are."""
        self._stuck = True

    def spike(
        self, temperature_c: float = 0.0, pressure_hpa: float = 0.0, humidity_pct: float = 0.0
    ) -> None:
        """The next conversion reads the air off by these amounts; the one after is right."""
        self._spike = (temperature_c, pressure_hpa, humidity_pct)

    def fail_next(self, transactions: int, error: int = errno.EIO) -> None:
        """The next ``transactions`` bus transactions fail with ``error`` (EIO: a glitch)."""
        self._failures, self._error = transactions, error

    def disappear(self, chip_id: int | None = None) -> None:
        """Take the part away: no device acknowledges the address (``chip_id`` None), or one
        with ``chip_id`` answers in its place."""
        if chip_id is None:
            self._absent = True
        else:
            self._registers[REG_CHIP_ID] = chip_id

    def recover(self) -> None:
        """End every fault. A part that had disappeared comes back through a power-on reset,
        as after a loose connector or a brown-out: its settings are gone."""
        if self._absent or self._registers[REG_CHIP_ID] != self._chip_id:
            self._power_on_reset()
        self._absent = self._stuck = False
        self._spike = (0.0, 0.0, 0.0)
        self._failures = 0

    def set_environment(
        self, temperature_c: float, pressure_hpa: float, humidity_pct: float
    ) -> None:
        """The air around the chip from now on."""
        self._environment = (temperature_c, pressure_hpa, humidity_pct)
        if self._registers[REG_CTRL_MEAS] & MODE_MASK == MODE_NORMAL:
            self._convert()

    def _write_data(self, adc_p: int, adc_t: int, adc_h: int) -> None:
        self._registers[REG_DATA : REG_DATA + 8] = bytes(
            (
                adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
                adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
                adc_h >> 8, adc_h & 0xFF,
            )
        )  # fmt: skip

    def _convert(self) -> None:
        """One measurement: invert the compensation for each quantity the settings enable."""
        if self._stuck:
            return
        temperature_c, pressure_hpa, humidity_pct = (
            value + offset for value, offset in zip(self._environment, self._spike, strict=True)
        )
        self._spike = (0.0, 0.0, 0.0)
        cal = self.calibration
        ctrl = self._registers[REG_CTRL_MEAS]
        osrs_t, osrs_p = ctrl >> 5, (ctrl >> 2) & 0b111
        osrs_h = self._registers[REG_CTRL_HUM] & 0b111
        if osrs_t == 0:  # without temperature there is no t_fine: nothing is converted
            self._write_data(SKIPPED_20BIT, SKIPPED_20BIT, SKIPPED_16BIT)
            return
        bits_t = _adc_bits(osrs_t)
        code_t = _nearest_code(
            lambda code: cal.t_fine(code << (20 - bits_t)), temperature_c * 5120, bits_t
        )
        adc_t = code_t << (20 - bits_t)
        t_fine = cal.t_fine(adc_t)
        adc_p = SKIPPED_20BIT
        if osrs_p:
            bits_p = _adc_bits(osrs_p)
            code_p = _nearest_code(
                lambda code: cal.pressure_q24_8(code << (20 - bits_p), t_fine),
                pressure_hpa * 100 * 256,
                bits_p,
            )
            adc_p = code_p << (20 - bits_p)
        adc_h = SKIPPED_16BIT
        if osrs_h:
            adc_h = _nearest_code(
                lambda code: cal.humidity_q22_10(code, t_fine), humidity_pct * 1024, 16
            )
        self._write_data(adc_p, adc_t, adc_h)

    def _check(self, i2c_addr: int) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "I2C bus is closed")
        if self._failures:
            self._failures -= 1
            raise OSError(self._error, os.strerror(self._error))
        if i2c_addr != self.address or self._absent:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")  # what a Pi says on no ACK

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        self._check(i2c_addr)
        return self._registers[register]

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]:
        self._check(i2c_addr)
        if not 0 < length <= SMBUS_BLOCK_MAX:
            raise ValueError(f"an SMBus block is 1..{SMBUS_BLOCK_MAX} bytes, not {length}")
        return list(self._registers[register : register + length])

    def write_byte_data(
        self, i2c_addr: int, register: int, value: int, force: bool | None = None
    ) -> None:
        self._check(i2c_addr)
        if register in self._read_only:
            return  # the chip ignores writes to read-only registers
        self._registers[register] = value & 0xFF
        if register == REG_CTRL_MEAS and value & MODE_MASK != MODE_SLEEP:
            self._convert()
            if value & MODE_MASK != MODE_NORMAL:  # a forced measurement ends in sleep mode
                self._registers[REG_CTRL_MEAS] = (value & ~MODE_MASK) | MODE_SLEEP

    def close(self) -> None:
        self._closed = True


class MockMcp3008:
    """An MCP3008 10-bit ADC on a board's SPI bus, answering the protocol bit by bit (datasheet
    figure 6-1).

    The master clocks a start bit, the single/differential bit and three channel bits; the
    chip answers with a null bit and the 10-bit code, MSB first. Input voltages are set by
    the simulator with ``set_voltage``.

    Faults: ``stick`` holds a channel's code whatever its input does, ``spike`` makes the next
    conversion of a channel read another voltage, ``disappear`` leaves MISO undriven (held at
    a level by the board's pull-up or pull-down) and ``recover`` ends every fault.

    The bits come from :class:`BoardSPI`'s transfers, not from edges on mock pins: gpiozero's
    ``MockSPIDevice`` answered through a chain of pin callbacks per clock edge, two thirds of a
    simulated reading's CPU, which a fleet of a thousand devices in a few processes could not
    afford. The driver under test (gpiozero's ``MCP3008`` over the board's SPI interface) is
    the same.
    """

    def __init__(self, board: SimulatedBoard, vref: float = DEFAULT_CALIBRATION.adc_vref) -> None:
        self.vref = vref
        self.voltages = [0.0] * 8
        self._held: dict[int, int] = {}
        self._spikes: dict[int, float] = {}
        self._miso_level: int | None = None
        board.attach(self, SPI0_PINS["select_pin"])

    def stick(self, channel: int) -> None:
        """The channel's code stays what the input reads now."""
        self._held[channel] = self.code(self.voltages[channel])

    def spike(self, channel: int, volts: float) -> None:
        """The next conversion of ``channel`` reads ``volts`` instead of its input."""
        self._spikes[channel] = volts

    def disappear(self, miso_level: int) -> None:
        """No chip answers: MISO reads ``miso_level`` on every clock (1: floating or pulled up,
        0: pulled down)."""
        self._miso_level = miso_level

    def recover(self) -> None:
        self._held.clear()
        self._spikes.clear()
        self._miso_level = None

    def set_voltage(self, channel: int, volts: float) -> None:
        self.voltages[channel] = volts

    def code(self, volts: float) -> int:
        """Datasheet transfer function: code = 1024 * Vin / Vref, saturating at 0 and 1023."""
        return min(max(int(1024 * volts / self.vref), 0), 1023)

    def exchange(self, mosi: Sequence[int]) -> list[int]:
        """One selection of the chip: the MISO level on each clock, given the MOSI bits (mode
        0: the chip reads MOSI on the rising edge, having set MISO for that clock)."""
        if self._miso_level is not None:
            return [self._miso_level] * len(mosi)
        miso: list[int] = []
        phase = "idle"  # a select starts the protocol afresh
        received: list[int] = []
        sending: list[int] = []
        for bit in mosi:
            miso.append(sending.pop(0) if sending else 0)
            received.append(bit)
            if phase == "idle":
                if bit:  # start bit
                    phase, received = "mode", []
            elif phase == "mode":
                phase, received = ("single" if bit else "differential"), []
            elif phase in ("single", "differential") and len(received) == 3:
                channel = received[0] << 2 | received[1] << 1 | received[2]
                volts = self._spikes.pop(channel, self.voltages[channel])
                if phase == "differential":  # IN+ is the channel, IN- its pair
                    volts -= self.voltages[channel ^ 1]
                code = self._held.get(channel, self.code(volts))
                sending = [(code >> i) & 1 for i in range(11, -1, -1)]  # sample, null, 10 bits
                phase = "converted"
        return miso


class BoardSPI(SPI):
    """Mode-0 SPI of one board only, to the chip attached at its select pin.

    Unlike gpiozero's software SPI it keeps no state outside its factory, so two boards with
    the same wiring stay apart. It does not reserve the pins: each ADC channel gets its own
    interface over the same pins, serialised by the board's lock. No chip at the select pin:
    MISO reads low (undriven, pulled down).
    """

    def __init__(
        self,
        clock_pin: int | str,
        mosi_pin: int | str,
        miso_pin: int | str,
        select_pin: int | str,
        *,
        pin_factory: SimulatedBoard,
    ) -> None:
        super().__init__(pin_factory=pin_factory)
        self._board = pin_factory
        self._lock = pin_factory.spi_lock
        self._select = pin_factory.pin(select_pin).info.name
        self._open = True

    def transfer(self, data: Sequence[int]) -> list[int]:
        mosi = [(word >> bit) & 1 for word in data for bit in range(7, -1, -1)]
        with self._lock:
            self._board.check_transfer()
            chip = self._board.chip_at(self._select)
            miso = chip.exchange(mosi) if chip is not None else [0] * len(mosi)
        words = []
        for start in range(0, len(miso), 8):
            word = 0
            for bit in miso[start : start + 8]:
                word = word << 1 | bit
            words.append(word)
        return words

    def _get_clock_mode(self) -> int:
        return 0

    def close(self) -> None:
        self._open = False
        super().close()

    @property
    def closed(self) -> bool:
        return not self._open


class SimulatedBoard(MockFactory):
    """A MockFactory whose SPI interfaces belong to it alone (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.spi_lock = RLock()
        self._spi_failures = 0
        self._chips: dict[str, MockMcp3008] = {}

    def attach(self, chip: MockMcp3008, select_pin: int | str) -> None:
        """Put ``chip`` on the SPI bus, selected by ``select_pin``."""
        self._chips[self.pin(select_pin).info.name] = chip

    def chip_at(self, select: str) -> MockMcp3008 | None:
        return self._chips.get(select)

    def fail_spi(self, transfers: int) -> None:
        """The next ``transfers`` SPI transfers fail with EIO, as spidev's ioctl can."""
        self._spi_failures = transfers

    def check_transfer(self) -> None:
        if self._spi_failures:
            self._spi_failures -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def _get_spi_class(self, shared: bool, hardware: bool) -> type[BoardSPI]:
        return BoardSPI


@dataclass(frozen=True)
class Environment:
    """What a device's sensors are exposed to, in the parts' own units: the air at the BME280,
    the light on the photodiode, the CO2 at the NDIR sensor and whether the PIR sees motion."""

    temperature_c: float
    pressure_hpa: float
    humidity_pct: float
    light_lux: float
    co2_ppm: float
    motion: bool


class FakeHardware:
    """The parts of one device on their wires, as a Pi with its sensors would present them.

    ``pin_factory`` and ``i2c_bus`` are what the agent's ``SensorSuite`` takes. ``expose`` puts
    an :class:`Environment` on the wires through each part's transfer function, and nothing
    else: a value beyond a part's range reaches the drivers as the part would show it (an ADC
    code at a rail, a BME280 conversion outside its operating range, humidity clamped by the
    compensation), so they flag it as they would on a Pi.

    The PIR's output can be stuck at a level (``stick_pir``) until ``release_pir``; faults of
    the other parts are injected on ``i2c_bus``, ``adc`` and ``pin_factory`` themselves.
    """

    def __init__(
        self, wiring: Wiring = DEFAULT_WIRING, calibration: AnalogCalibration = DEFAULT_CALIBRATION
    ) -> None:
        self.wiring = wiring
        self.calibration = calibration
        self.pin_factory = SimulatedBoard()
        self.adc = MockMcp3008(self.pin_factory, calibration.adc_vref)
        self.pir_pin = self.pin_factory.pin(wiring.pir_pin)
        self.i2c_bus = FakeBme280Bus(wiring.bme280_address)
        self.pir_stuck: bool | None = None
        self.environment: Environment | None = None

    def expose(self, environment: Environment) -> None:
        """The sensors measure ``environment`` from now on."""
        self.environment = environment
        cal = self.calibration
        self.i2c_bus.set_environment(
            environment.temperature_c, environment.pressure_hpa, environment.humidity_pct
        )
        self.adc.set_voltage(self.wiring.light_channel, cal.volts_for_lux(environment.light_lux))
        self.adc.set_voltage(self.wiring.co2_channel, cal.volts_for_co2(environment.co2_ppm))
        if environment.motion if self.pir_stuck is None else self.pir_stuck:
            self.pir_pin.drive_high()
        else:
            self.pir_pin.drive_low()

    def stick_pir(self, level: bool) -> None:
        """The PIR's output holds ``level`` whatever moves in the room."""
        self.pir_stuck = level
        if self.environment is not None:
            self.expose(self.environment)

    def release_pir(self) -> None:
        self.pir_stuck = None
        if self.environment is not None:
            self.expose(self.environment)


class SimulatedDevice(FakeHardware):
    """The hardware of one device in one room.

    ``sync`` puts the room's present state on the wires, adding the sensors' own errors
    (calibration offsets from the room profile, and measurement noise).
    """

    def __init__(
        self,
        room: Room,
        seed: int,
        wiring: Wiring = DEFAULT_WIRING,
        calibration: AnalogCalibration = DEFAULT_CALIBRATION,
    ) -> None:
        super().__init__(wiring, calibration)
        self.room = room
        self._noise = np.random.default_rng(seed)
        self.sync()

    @property
    def name(self) -> str:
        return self.room.profile.name

    @property
    def now(self) -> float:
        """The simulated clock (epoch seconds), for stamping readings."""
        return self.room.state.time

    def sync(self) -> None:
        """Put the room's state, as this device's sensors perceive it, on the wires."""
        state = self.room.state
        profile = self.room.profile
        lux = state.light_lux * profile.light_factor * (1.0 + self._noise.normal(0.0, 0.03))
        co2 = state.co2_ppm + profile.co2_offset_ppm + self._noise.normal(0.0, 25.0)
        self.expose(
            Environment(
                temperature_c=state.temperature_c + profile.temperature_offset_c,
                pressure_hpa=state.pressure_hpa,
                humidity_pct=min(max(state.humidity_pct + profile.humidity_offset_pct, 0.0), 100.0),
                light_lux=max(lux, 0.0),
                co2_ppm=max(co2, 0.0),
                motion=state.motion,
            )
        )

    def step(self, seconds: float) -> None:
        """Let ``seconds`` of room time pass, then put the new state on the wires."""
        self.room.advance(seconds)
        self.sync()
