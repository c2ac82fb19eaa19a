"""Datasheet facts about the sensors truscl reads, shared by the drivers and the fake hardware.

The drivers (:mod:`truscl.agent.sensors`) turn register values into readings with these
constants and formulas; the simulator (:mod:`truscl.sim.hardware`) turns a room's air into the
register values a real part would hold, with the same ones. Keeping them here, in a module that
belongs to neither, lets the agent run without the simulator and the simulator without the agent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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

# The part's operating range (datasheet table 1); outside it a value means a broken read.
TEMPERATURE_RANGE_C = (-40.0, 85.0)
PRESSURE_RANGE_HPA = (300.0, 1100.0)
HUMIDITY_RANGE_PCT = (0.0, 100.0)


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
