"""Sensor faults, injected in the simulated hardware, become data: detected, logged once, kept
out of training, visible in the health file and cleared when the hardware recovers.

The sampler is driven read by read on the simulated room's clock (300 s a read), so no test
waits on the wall clock; the one test of the sampler's own thread waits on an event.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from truscl.agent.health import (
    HEALTH_FILE,
    PIR_STUCK_HIGH_S,
    SENSORS,
    STUCK_READS,
    Status,
    describe_health,
    read_health,
)
from truscl.agent.sampling import Sampler, SensingThread
from truscl.agent.sensors import DEFAULT_CALIBRATION, DEFAULT_WIRING, Reading, SensorSuite
from truscl.sim import make_fleet, make_rooms
from truscl.sim.fleet import MONDAY_2024_01_08
from truscl.sim.hardware import SimulatedDevice
from truscl.sim.rooms import Room

INTERVAL_S = 300.0
WEEK_OF_READS = 7 * 24 * 3600 // 300
CO2 = DEFAULT_WIRING.co2_channel
LIGHT = DEFAULT_WIRING.light_channel


class Rig:
    """One simulated device, its suite and a sampler keeping health in ``state``."""

    def __init__(self, device: SimulatedDevice, state: Path) -> None:
        self.device = device
        self.state = state
        self.suite = SensorSuite(device.pin_factory, device.i2c_bus)
        self.sampler = Sampler(self.read, INTERVAL_S, 100_000, state_folder=state)

    def read(self) -> Reading:
        self.device.step(INTERVAL_S)
        return self.suite.read(self.device.now)

    def run(self, reads: int) -> list[Reading]:
        readings = [self.sampler.sample() for _ in range(reads)]
        assert all(r is not None for r in readings)  # no read ever raised
        return [r for r in readings if r is not None]

    def health(self, sensor: str) -> dict[str, Any]:
        sensors: dict[str, dict[str, Any]] = read_health(self.state)["sensors"]
        return sensors[sensor]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    (device,) = make_fleet(1, seed=3)
    rig = Rig(device, tmp_path)
    yield rig
    rig.suite.close()


@dataclass(frozen=True)
class Case:
    """A fault: how to inject it, which sensors it shows on and as what, how many reads to
    keep it, and how the hardware recovers."""

    inject: Callable[[SimulatedDevice], None]
    sensors: tuple[str, ...]
    status: Status
    reads: int
    recover: Callable[[SimulatedDevice], None] = lambda device: None
    undetected: int = 0
    """Reads at the start of the fault that look healthy (a stuck run must grow first)."""


def stick_co2_at_1500_ppm(device: SimulatedDevice) -> None:
    """A frozen output, at a level no read before it had, so the run starts with the fault."""
    device.adc.set_voltage(CO2, DEFAULT_CALIBRATION.volts_for_co2(1500.0))
    device.adc.stick(CO2)


def unplug_co2_with_the_lamp_on(device: SimulatedDevice) -> None:
    """The CO2 output pulled to ground. The lamp is on: in the dark, light reads code 0 too and
    the ADC reads exactly as if no chip answered (both channels are then flagged missing)."""
    device.adc.set_voltage(LIGHT, DEFAULT_CALIBRATION.volts_for_lux(300.0))
    device.adc.stick(LIGHT)
    device.adc.set_voltage(CO2, 0.0)
    device.adc.stick(CO2)


CASES = {
    "i2c-errors": Case(lambda d: d.i2c_bus.fail_next(3), ("bme280",), Status.IO_ERROR, reads=3),
    "i2c-timeouts": Case(
        lambda d: d.i2c_bus.fail_next(2, error=errno.ETIMEDOUT),
        ("bme280",),
        Status.IO_ERROR,
        reads=2,
    ),
    "bme280-unplugged": Case(
        lambda d: d.i2c_bus.disappear(),
        ("bme280",),
        Status.MISSING,
        reads=4,
        recover=lambda d: d.i2c_bus.recover(),
    ),
    "bme280-replaced-by-bmp280": Case(
        lambda d: d.i2c_bus.disappear(chip_id=0x58),
        ("bme280",),
        Status.MISSING,
        reads=4,
        recover=lambda d: d.i2c_bus.recover(),
    ),
    "bme280-stuck": Case(
        lambda d: d.i2c_bus.stick(),
        ("bme280",),
        Status.STUCK,
        reads=STUCK_READS["bme280"] + 3,
        recover=lambda d: d.i2c_bus.recover(),
        undetected=STUCK_READS["bme280"] - 2,  # the read before the fault starts the run
    ),
    "temperature-spike": Case(
        lambda d: d.i2c_bus.spike(temperature_c=12.0), ("bme280",), Status.SPIKE, reads=1
    ),
    "humidity-spike": Case(
        lambda d: d.i2c_bus.spike(humidity_pct=-35.0), ("bme280",), Status.SPIKE, reads=1
    ),
    "temperature-beyond-the-part": Case(
        lambda d: d.i2c_bus.spike(temperature_c=120.0), ("bme280",), Status.SPIKE, reads=1
    ),
    "co2-stuck": Case(
        stick_co2_at_1500_ppm,
        ("co2",),
        Status.STUCK,
        reads=STUCK_READS["co2"] + 2,
        recover=lambda d: d.adc.recover(),
        undetected=STUCK_READS["co2"] - 1,
    ),
    "co2-spike": Case(
        lambda d: d.adc.spike(CO2, DEFAULT_CALIBRATION.volts_for_co2(4900.0)),
        ("co2",),
        Status.SPIKE,
        reads=1,
    ),
    "co2-sensor-disconnected": Case(
        unplug_co2_with_the_lamp_on,
        ("co2",),
        Status.MISSING,
        reads=3,
        recover=lambda d: d.adc.recover(),
    ),
    "adc-gone-miso-high": Case(
        lambda d: d.adc.disappear(1),
        ("light", "co2"),
        Status.MISSING,
        reads=3,
        recover=lambda d: d.adc.recover(),
    ),
    "adc-gone-miso-low": Case(
        lambda d: d.adc.disappear(0),
        ("light", "co2"),
        Status.MISSING,
        reads=3,
        recover=lambda d: d.adc.recover(),
    ),
    "spi-errors": Case(
        lambda d: d.pin_factory.fail_spi(2), ("light", "co2"), Status.IO_ERROR, reads=1
    ),
    "pir-stuck-high": Case(
        lambda d: d.stick_pir(True),
        ("pir",),
        Status.STUCK,
        reads=int(PIR_STUCK_HIGH_S / INTERVAL_S) + 5,
        recover=lambda d: d.release_pir(),
        undetected=int(PIR_STUCK_HIGH_S / INTERVAL_S),
    ),
}


def warnings_about(caplog: pytest.LogCaptureFixture, sensor: str, status: Status) -> int:
    return sum(
        1
        for record in caplog.records
        if record.levelno == logging.WARNING
        and record.getMessage().startswith(f"sensor {sensor}: {status}:")
    )


@pytest.mark.parametrize("name", list(CASES))
def test_a_fault_is_detected_logged_once_kept_out_of_training_and_cleared(
    rig: Rig, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a healthy start
    case = CASES[name]
    caplog.set_level(logging.INFO, logger="truscl.agent.health")
    before = rig.run(4)
    assert all(r.valid for r in before)
    rig.sampler.drain()

    # Execute: break the hardware, let it recover, read on
    case.inject(rig.device)
    during = rig.run(case.reads)
    in_fault = rig.health(case.sensors[0])
    case.recover(rig.device)
    after = rig.run(3)

    # Assert: detected on every read of the fault once the fault can be seen, and only there
    faulty = during[case.undetected :]
    for reading in faulty:
        assert {(f.sensor, f.status) for f in reading.faults} == {
            (sensor, case.status) for sensor in case.sensors
        }, reading.faults
    assert [r.faults for r in during[: case.undetected] + after if not r.valid] == []
    # ... logged once per sensor, recovery noted once
    for sensor in case.sensors:
        assert warnings_about(caplog, sensor, case.status) == 1
    recoveries = [r for r in caplog.records if "is ok again" in r.getMessage()]
    assert len(recoveries) == len(case.sensors)
    # ... in the health file while it lasted, and cleared after
    assert in_fault["status"] == case.status
    assert in_fault["since"] == faulty[0].timestamp
    for sensor in case.sensors:
        health = rig.health(sensor)
        assert health["status"] == Status.OK
        assert health["since"] == after[0].timestamp
        assert health["episodes"] == {
            s: int(s == case.status) for s in map(str, Status) if s != "ok"
        }
        assert health["invalid_reads"] == len(faulty)
    for sensor in set(SENSORS) - set(case.sensors):
        assert rig.health(sensor)["invalid_reads"] == 0
    # ... and only valid readings reach training
    window = rig.sampler.drain()
    assert all(r.valid for r in window)
    assert [r.timestamp for r in window] == [r.timestamp for r in during + after if r.valid]
    assert all(r.encode() for r in window)


def test_other_sensors_are_still_read_while_the_bme280_fails(rig: Rig) -> None:
    # Prepare
    rig.device.i2c_bus.disappear()

    # Execute
    (reading,) = rig.run(1)

    # Assert
    assert math.isnan(reading.temperature_c) and math.isnan(reading.humidity_pct)
    assert not math.isnan(reading.light_lux) and not math.isnan(reading.co2_ppm)
    assert reading.motion == rig.device.room.state.motion


def test_a_bme280_absent_at_start_is_picked_up_when_it_answers(tmp_path: Path) -> None:
    # Prepare: the suite starts while the part is unplugged
    (device,) = make_fleet(1, seed=5)
    device.i2c_bus.disappear()
    rig = Rig(device, tmp_path)

    # Execute
    absent = rig.run(2)
    device.i2c_bus.recover()
    present = rig.run(2)
    rig.suite.close()

    # Assert
    assert [f.status for r in absent for f in r.faults] == [Status.MISSING] * 2
    assert all(r.valid for r in present)
    assert present[-1].humidity_pct == pytest.approx(
        device.room.state.humidity_pct + device.room.profile.humidity_offset_pct, abs=0.1
    )  # set up again after its power-on reset: humidity is measured, not skipped


def test_a_long_outage_does_not_turn_the_return_into_a_spike(rig: Rig) -> None:
    # Prepare: the room changes while the BME280 is gone for half a day
    rig.run(2)
    rig.device.i2c_bus.disappear()
    rig.run(144)

    # Execute
    rig.device.i2c_bus.recover()
    after = rig.run(2)

    # Assert
    assert all(r.valid for r in after)
    assert rig.health("bme280")["episodes"]["spike"] == 0


def test_the_sampler_thread_survives_any_read(tmp_path: Path) -> None:
    # Prepare: a read that fails in every way, then counts the reads after it
    (device,) = make_fleet(1, seed=2)
    suite = SensorSuite(device.pin_factory, device.i2c_bus)
    calls = 0
    done = threading.Event()

    def read() -> Reading:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug in a driver")
        if calls == 3:
            device.i2c_bus.fail_next(5)
            device.pin_factory.fail_spi(10)
        if calls == 12:
            done.set()
        device.step(INTERVAL_S)
        return suite.read(device.now)

    sampler = Sampler(read, interval=0.001, capacity=100, state_folder=tmp_path)

    # Execute
    sampler.start()
    finished = done.wait(30)
    alive = sampler.running
    sampler.stop()
    suite.close()

    # Assert
    assert finished and alive
    assert sampler.failures == 1
    assert len(sampler.drain()) >= 4  # reads after the faults cleared
    health = read_health(tmp_path)["sensors"]
    assert health["bme280"]["episodes"]["io-error"] == 1
    assert health["bme280"]["invalid_reads"] == 5


def test_one_sensing_thread_reads_several_devices_each_at_its_pace(tmp_path: Path) -> None:
    """A process's devices share one thread: every read happens on it, each sampler keeps
    being read, and one stopped is read no more while the others go on."""
    # Prepare: three devices, each counting its reads and on which thread they ran
    sensing = SensingThread()
    fleet = make_fleet(3, seed=4)
    suites = [SensorSuite(device.pin_factory, device.i2c_bus) for device in fleet]
    threads: list[set[int]] = [set(), set(), set()]
    counts = [0, 0, 0]
    reached = [threading.Event() for _ in fleet]
    target = [5, 5, 5]

    def reader(index: int) -> Callable[[], Reading]:
        def read() -> Reading:
            threads[index].add(threading.get_ident())
            counts[index] += 1
            if counts[index] >= target[index]:
                reached[index].set()
            fleet[index].step(INTERVAL_S)
            return suites[index].read(fleet[index].now)

        return read

    samplers = [
        Sampler(reader(i), interval=0.001 * (i + 1), capacity=100, thread=sensing) for i in range(3)
    ]

    # Execute
    for sampler in samplers:
        sampler.start()
    first = all(event.wait(30) for event in reached)
    samplers[0].stop()
    stopped_at = counts[0]
    for index in (1, 2):
        target[index] = counts[index] + 5
        reached[index].clear()
    after = all(reached[index].wait(30) for index in (1, 2))
    running = [sampler.running for sampler in samplers]
    for sampler in samplers[1:]:
        sampler.stop()
    sensing.stop()
    for suite in suites:
        suite.close()

    # Assert
    assert first and after
    assert threads[0] == threads[1] == threads[2] and len(threads[0]) == 1
    assert threading.get_ident() not in threads[0]
    assert counts[0] == stopped_at
    assert running == [False, True, True]
    assert all(len(sampler.drain()) >= 5 for sampler in samplers)


def test_the_health_file_and_its_description(rig: Rig) -> None:
    # Prepare
    assert read_health(rig.state) == {}
    assert describe_health({}) == ["sensors   no health recorded yet"]
    rig.run(1)
    stick_co2_at_1500_ppm(rig.device)

    # Execute
    rig.run(STUCK_READS["co2"])
    health = read_health(rig.state)
    lines = describe_health(health)

    # Assert
    assert (rig.state / HEALTH_FILE).exists()
    assert health["schema"] == 1
    assert health["updated"] == rig.device.now
    assert list(health["sensors"]) == list(SENSORS)
    assert set(health["sensors"]["co2"]) == {
        "status",
        "since",
        "detail",
        "episodes",
        "invalid_reads",
    }
    assert lines[0].startswith("sensor    bme280  ok since 2024-01-")
    assert lines[2].startswith("sensor    co2     STUCK since 2024-01-")
    assert "same raw value for 12 reads (1 stuck episode(s), 1 invalid read(s))" in lines[2]


def test_a_healthy_fleet_raises_no_alarm_in_a_week(tmp_path: Path) -> None:
    # Prepare: one device in a room of every archetype, at the real sampling interval
    profiles = make_rooms(5, seed=13)
    devices = [
        SimulatedDevice(Room(p, seed=100 + i, start=MONDAY_2024_01_08), seed=200 + i)
        for i, p in enumerate(profiles)
    ]

    for index, device in enumerate(devices):
        rig = Rig(device, tmp_path / f"device-{index}")

        # Execute
        readings = rig.run(WEEK_OF_READS)
        rig.suite.close()

        # Assert
        assert [r.faults for r in readings if not r.valid] == [], device.name
        assert len(rig.sampler.drain()) == WEEK_OF_READS
        for sensor in SENSORS:
            health = rig.health(sensor)
            assert health["status"] == Status.OK
            assert health["since"] == readings[0].timestamp
            assert health["invalid_reads"] == 0
