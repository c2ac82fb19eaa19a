"""Agent sensor drivers against simulated hardware: BME280 over I2C, PIR, MCP3008."""

from __future__ import annotations

import itertools
import math

import cbor2
import pytest
from gpiozero import MCP3008, Device

from truscl.agent.health import Fault, Status
from truscl.agent.sensors import (
    DEFAULT_CALIBRATION,
    DEFAULT_WIRING,
    Bme280,
    Reading,
    SensorSuite,
)
from truscl.errors import ConfigError, SensorError
from truscl.learning.features import DEFAULT_FEATURES, feature_matrix
from truscl.sim import FakeBme280Bus, make_fleet
from truscl.sim.hardware import (
    TYPICAL_CALIBRATION,
    MockMcp3008,
    SimulatedBoard,
    SimulatedDevice,
)

ADC_HALF_STEP_V = DEFAULT_CALIBRATION.adc_vref / 1024 / 2


def test_compensation_reproduces_the_datasheet_example() -> None:
    # Prepare: the BMP280 datasheet's worked example (section 3.12)
    cal = TYPICAL_CALIBRATION

    # Execute
    t_fine = cal.t_fine(519888)
    pressure_pa = cal.pressure_q24_8(415148, t_fine) / 256

    # Assert
    assert t_fine == 128422
    assert cal.temperature_centi_c(t_fine) == 2508
    assert pressure_pa == pytest.approx(100653.27, abs=0.5)


@pytest.mark.parametrize(
    ("temperature_c", "pressure_hpa", "humidity_pct"),
    list(
        itertools.product(
            (-20.0, 0.0, 18.37, 25.0, 41.5), (870.0, 1013.25, 1084.9), (8.0, 47.3, 93.0)
        )
    ),
)
def test_bme280_reads_back_the_air(
    temperature_c: float, pressure_hpa: float, humidity_pct: float
) -> None:
    # Prepare
    bus = FakeBme280Bus()
    sensor = Bme280(bus)
    bus.set_environment(temperature_c, pressure_hpa, humidity_pct)

    # Execute
    measured_t, measured_p, measured_h = sensor.read()

    # Assert: within the part's output resolution
    assert measured_t == pytest.approx(temperature_c, abs=0.01)
    assert measured_p == pytest.approx(pressure_hpa, abs=0.1)
    assert measured_h == pytest.approx(humidity_pct, abs=0.1)


def test_bme280_measures_only_when_triggered() -> None:
    # Prepare: a forced-mode part holds its last conversion until the next trigger
    bus = FakeBme280Bus()
    sensor = Bme280(bus)
    bus.set_environment(21.0, 1000.0, 40.0)
    first = sensor.read()

    # Execute
    bus.set_environment(23.0, 1001.0, 45.0)
    second = sensor.read()

    # Assert
    assert first[0] == pytest.approx(21.0, abs=0.01)
    assert second[0] == pytest.approx(23.0, abs=0.01)


def test_wrong_chip_id_is_a_sensor_error() -> None:
    # Prepare: a BMP280 (chip id 0x58) has no humidity sensor
    bus = FakeBme280Bus(chip_id=0x58)

    # Execute / Assert
    with pytest.raises(SensorError, match="chip id 0x58"):
        Bme280(bus)


def test_no_chip_at_the_address_is_an_os_error() -> None:
    # Prepare
    bus = FakeBme280Bus(address=0x77)

    # Execute / Assert
    with pytest.raises(OSError):
        Bme280(bus, address=0x76)


@pytest.mark.parametrize(
    ("air", "quantity"),
    [((150.0, 1000.0, 50.0), "temperature"), ((20.0, 1300.0, 50.0), "pressure")],
)
def test_impossible_values_are_sensor_errors(
    air: tuple[float, float, float], quantity: str
) -> None:
    # Prepare
    bus = FakeBme280Bus()
    sensor = Bme280(bus)
    bus.set_environment(*air)

    # Execute / Assert
    with pytest.raises(SensorError, match=quantity):
        sensor.read()


@pytest.fixture
def device() -> SimulatedDevice:
    return make_fleet(1, seed=3)[0]


def test_a_suite_without_some_parts_reads_the_others(device: SimulatedDevice) -> None:
    # Prepare: no CO2 sensor and no PIR fitted
    with SensorSuite(device.pin_factory, device.i2c_bus, parts=("bme280", "light")) as suite:
        device.pir_pin.drive_high()
        # Execute
        reading = suite.read(device.now)
        parts = suite.parts

    # Assert: valid, the missing quantities unknown rather than faults
    assert parts == {"bme280", "light"}
    assert reading.valid and reading.encode()
    assert math.isnan(reading.co2_ppm) and reading.motion is False
    assert 0 < reading.light_lux and 15 < reading.temperature_c < 30
    with pytest.raises(ConfigError, match="unknown sensor 'sht31'"):
        SensorSuite(device.pin_factory, device.i2c_bus, parts=("sht31",))


def test_suite_sees_the_pir_pin(device: SimulatedDevice) -> None:
    # Prepare
    with SensorSuite(device.pin_factory, device.i2c_bus) as suite:
        # Execute
        device.pir_pin.drive_high()
        high = suite.read(device.now)
        device.pir_pin.drive_low()
        low = suite.read(device.now)

    # Assert
    assert (high.motion, high.label()) == (True, 1)
    assert (low.motion, low.label()) == (False, 0)


@pytest.mark.parametrize(
    ("lux", "ppm"), [(0.0, 0.0), (37.0, 415.0), (480.0, 1234.0), (1999.0, 4999.0)]
)
def test_adc_round_trip_within_quantisation(
    device: SimulatedDevice, lux: float, ppm: float
) -> None:
    # Prepare
    cal = DEFAULT_CALIBRATION
    with SensorSuite(device.pin_factory, device.i2c_bus) as suite:
        device.adc.set_voltage(DEFAULT_WIRING.light_channel, cal.volts_for_lux(lux))
        device.adc.set_voltage(DEFAULT_WIRING.co2_channel, cal.volts_for_co2(ppm))

        # Execute
        reading = suite.read(device.now)

    # Assert: the driver reconstructs at mid-step, so the error is at most half a step
    assert reading.light_lux == pytest.approx(lux, abs=cal.lux(ADC_HALF_STEP_V) + 1e-9)
    assert reading.co2_ppm - ppm == pytest.approx(0.0, abs=ADC_HALF_STEP_V / 1.6 * 5000 + 1e-9)


@pytest.mark.parametrize("differential", [False, True])
def test_gpiozero_reads_the_datasheet_code_on_every_channel(differential: bool) -> None:
    """gpiozero's own MCP3008 driver, over the simulated board's SPI interface, gets the code
    of the datasheet's transfer function on all eight channels (differential: IN+ the
    channel, IN- its pair), and a chip that is not there reads as MISO's level."""
    # Prepare
    board = SimulatedBoard()
    chip = MockMcp3008(board, vref=3.3)
    volts = [0.0, 0.41, 1.0, 1.65, 2.2, 2.9, 3.29, 3.3]
    for channel, value in enumerate(volts):
        chip.set_voltage(channel, value)
    adcs = [MCP3008(channel, differential=differential, pin_factory=board) for channel in range(8)]

    # Execute
    codes = [adc.raw_value for adc in adcs]
    chip.disappear(1)
    gone_high = adcs[3].raw_value
    chip.disappear(0)
    gone_low = adcs[3].raw_value

    # Assert
    def expected(channel: int) -> int:
        value = volts[channel] - (volts[channel ^ 1] if differential else 0.0)
        return min(max(int(1024 * value / 3.3), 0), 1023)

    assert codes == [expected(channel) for channel in range(8)]
    assert (gone_high, gone_low) == (1023, 0)
    for adc in adcs:
        adc.close()


def test_two_devices_in_one_process_stay_apart() -> None:
    # Prepare
    default_factory = Device.pin_factory
    first, second = make_fleet(2, seed=11)
    cal = DEFAULT_CALIBRATION
    with (
        SensorSuite(first.pin_factory, first.i2c_bus) as first_suite,
        SensorSuite(second.pin_factory, second.i2c_bus) as second_suite,
    ):
        first.pir_pin.drive_high()
        second.pir_pin.drive_low()
        first.adc.set_voltage(DEFAULT_WIRING.light_channel, cal.volts_for_lux(100.0))
        second.adc.set_voltage(DEFAULT_WIRING.light_channel, cal.volts_for_lux(900.0))
        first.i2c_bus.set_environment(18.0, 1000.0, 30.0)
        second.i2c_bus.set_environment(24.0, 1000.0, 60.0)

        # Execute
        a = first_suite.read(first.now)
        b = second_suite.read(second.now)

    # Assert
    assert (a.motion, b.motion) == (True, False)
    assert a.light_lux == pytest.approx(100.0, abs=2.0)
    assert b.light_lux == pytest.approx(900.0, abs=2.0)
    assert (round(a.temperature_c), round(b.temperature_c)) == (18, 24)
    assert Device.pin_factory is default_factory  # nothing fell back to the global default


def test_closing_the_suite_frees_the_pins(device: SimulatedDevice) -> None:
    # Prepare
    with SensorSuite(device.pin_factory, device.i2c_bus):
        pass

    # Execute: the same pins can be claimed again, but the closed bus refuses to talk
    with SensorSuite(device.pin_factory, device.i2c_bus) as on_closed_bus:
        refused = on_closed_bus.read(device.now)
    with SensorSuite(device.pin_factory, FakeBme280Bus()) as again:
        fresh = again.read(device.now)

    # Assert
    assert [(f.sensor, f.status) for f in refused.faults] == [("bme280", Status.IO_ERROR)]
    assert "closed" in refused.faults[0].detail
    assert (fresh.timestamp, fresh.valid) == (device.now, True)


def test_reading_features_label_and_encoding() -> None:
    # Prepare
    reading = Reading(1.7e9, 21.5, 40.25, 1001.5, 350.0, 812.5, True)

    # Execute
    encoded = reading.encode()

    # Assert
    assert feature_matrix(DEFAULT_FEATURES, [reading]).tolist() == [[21.5, 40.25, 350.0, 812.5]]
    assert reading.label() == 1
    assert encoded == Reading(1.7e9, 21.5, 40.25, 1001.5, 350.0, 812.5, True).encode()
    assert cbor2.loads(encoded) == [1, 1.7e9, 21.5, 40.25, 1001.5, 350.0, 812.5, True]
    assert encoded != Reading(1.7e9, 21.5, 40.25, 1001.5, 350.0, 812.5, False).encode()


def test_an_invalid_reading_has_no_merkle_leaf() -> None:
    # Prepare
    fault = Fault("co2", Status.STUCK, "same raw value for 12 reads")
    reading = Reading(1.7e9, 21.5, 40.25, 1001.5, 350.0, 812.5, True, faults=(fault,))

    # Execute / Assert
    assert not reading.valid
    with pytest.raises(ValueError, match="not training data"):
        reading.encode()


def test_stepping_the_device_changes_what_the_suite_reads(device: SimulatedDevice) -> None:
    # Prepare
    with SensorSuite(device.pin_factory, device.i2c_bus) as suite:
        # Execute: a simulated day in 5-minute steps
        readings = []
        for _ in range(288):
            device.step(300.0)
            readings.append(suite.read(device.now))

    # Assert
    state = device.room.state
    assert readings[-1].timestamp == state.time
    assert readings[-1].motion == state.motion
    assert readings[-1].co2_ppm == pytest.approx(
        state.co2_ppm + device.room.profile.co2_offset_ppm, abs=150
    )
    assert len({r.light_lux for r in readings}) > 10
