"""Recorded traces: a CSV replayed through the fake hardware comes back through the agent's real
drivers, quantised as the parts would; bad input is named; the ``trace`` backend and the demo's
split of a trace across devices (``truscl demo --data``)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from truscl.agent.config import AgentConfig
from truscl.agent.hardware import load_backend
from truscl.agent.health import Status
from truscl.agent.sensors import Reading
from truscl.cli import main
from truscl.datasheets import DEFAULT_CALIBRATION
from truscl.demo import DemoConfig, run_demo
from truscl.demo.data import RecordedTrace
from truscl.errors import ConfigError
from truscl.sim.fleet import MONDAY_2024_01_08, make_fleet
from truscl.sim.trace import Sample, Trace, TraceError, TraceMap, map_beside, record, replay

DAY = 86_400
INTERVAL = 300.0
PER_DAY = int(DAY / INTERVAL)

# What the parts resolve at the drivers' settings (x1 oversampling): the BME280's temperature
# in 0.01 degC (the compensation's unit) plus half its ~0.005 degC step, pressure within two
# 16-bit steps of ~2.6 Pa, humidity within its ~0.008 % step; the MCP3008 reads a code back at
# the middle of its step, so light and CO2 are off by at most half a step.
CAL = DEFAULT_CALIBRATION
LUX_HALF_STEP = (CAL.lux(CAL.volts(1)) - CAL.lux(CAL.volts(0))) / 2
CO2_HALF_STEP = (CAL.co2_ppm(CAL.volts(1)) - CAL.co2_ppm(CAL.volts(0))) / 2
TOLERANCE = {"temperature_c": 0.01, "pressure_hpa": 0.06, "humidity_pct": 0.01}

ONE_ROOM_MAP = """
[timestamp]
column = "time"
format = "iso8601"

[temperature]
column = "temp_f"
unit = "F"

[humidity]
column = "rh"

[pressure]
column = "p"
unit = "Pa"

[light]
column = "lux"

[co2]
column = "co2"

[motion]
column = "people"
unit = "count"
"""


def recorded(tmp_path: Path, rooms: int = 2, days: int = 4) -> Path:
    """A trace the room simulator writes: ``rooms`` rooms, whole days of 5-minute rows."""
    path = tmp_path / "rooms.csv"
    record(path, make_fleet(rooms, seed=11), days * PER_DAY - 1, INTERVAL)
    return path


def one_room(tmp_path: Path, rows: list[str], mapping: str = ONE_ROOM_MAP) -> Path:
    path = tmp_path / "room.csv"
    path.write_text("time,temp_f,rh,p,lux,co2,people\n" + "\n".join(rows) + "\n")
    map_beside(path).write_text(mapping)
    return path


def assert_read_back(reading: Reading, sample: Sample) -> None:
    env = sample.environment
    assert reading.valid, reading.faults
    assert reading.timestamp == sample.timestamp
    for quantity, tolerance in TOLERANCE.items():
        assert getattr(reading, quantity) == pytest.approx(getattr(env, quantity), abs=tolerance)
    assert reading.light_lux == pytest.approx(env.light_lux, abs=LUX_HALF_STEP + 1e-9)
    assert reading.co2_ppm == pytest.approx(env.co2_ppm, abs=CO2_HALF_STEP + 1e-9)
    assert reading.motion == env.motion


# --- Replay through the drivers ----------------------------------------------------------------


def test_a_recorded_trace_comes_back_through_the_drivers_within_their_quantisation(
    tmp_path: Path,
) -> None:
    # Prepare
    trace = Trace.load(recorded(tmp_path, rooms=2, days=2))
    # Execute
    readings = replay(trace)
    # Assert
    assert trace.skipped == 0 and len(readings) == len(trace.samples) == 2 * (2 * PER_DAY - 1)
    for reading, sample in zip(readings, trace.samples, strict=True):
        assert_read_back(reading, sample)
    assert {r.motion for r in readings} == {False, True}  # the rooms were used and empty


def test_units_and_iso_timestamps_are_converted_to_the_parts_units(tmp_path: Path) -> None:
    # Prepare: 68 F is 20 C, 100000 Pa is 1000 hPa; two people are motion
    path = one_room(
        tmp_path,
        [
            "2024-03-04T08:00:00,68.0,45.5,100000,320,650,0",
            "2024-03-04 08:05:00+00:00,69.8,46.0,100010,330,700,2",
            "2024-03-04T09:10:00+01:00,71.6,46.5,100020,340,720,1",
        ],
    )
    # Execute
    trace = Trace.load(path)
    readings = replay(trace)
    # Assert
    temperatures = [s.environment.temperature_c for s in trace.samples]
    assert temperatures == pytest.approx([20.0, 21.0, 22.0])
    assert [s.environment.pressure_hpa for s in trace.samples] == pytest.approx(
        [1000.0, 1000.1, 1000.2]
    )
    start = 1_709_539_200  # 2024-03-04T08:00:00Z
    assert [s.timestamp for s in trace.samples] == [start, start + 300, start + 600]
    assert [r.motion for r in readings] == [False, True, True]
    for reading, sample in zip(readings, trace.samples, strict=True):
        assert_read_back(reading, sample)


def test_a_trace_without_pressure_reads_the_standard_atmosphere(tmp_path: Path) -> None:
    mapping = ONE_ROOM_MAP.replace('[pressure]\ncolumn = "p"\nunit = "Pa"\n', "")
    path = one_room(tmp_path, ["2024-03-04T08:00:00,68,45,1,320,650,0"], mapping)

    (reading,) = replay(Trace.load(path))

    assert reading.pressure_hpa == pytest.approx(1013.25, abs=TOLERANCE["pressure_hpa"])


def test_bad_rows_are_logged_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a good row, then five bad ones, then a good one
    path = one_room(
        tmp_path,
        [
            "2024-03-04T08:00:00,68,45,100000,320,650,0",
            "2024-03-04T08:05:00,warm,45,100000,320,650,0",
            "2024-03-04T08:10:00,68,,100000,320,650,0",
            "yesterday,68,45,100000,320,650,0",
            "2024-03-04T08:20:00,68,45,100000,320,650,-1",
            "2024-03-04T08:25:00,68,45,100000",
            "2024-03-04T08:30:00,68,nan,100000,320,650,0",
            "2024-03-04T08:35:00,68.5,45,100000,320,650,1",
        ],
    )
    # Execute
    with caplog.at_level(logging.WARNING, logger="truscl.sim.trace"):
        trace = Trace.load(path)
    # Assert
    assert trace.skipped == 6
    assert [s.line for s in trace.samples] == [2, 9]
    assert "line 3 skipped: temp_f 'warm' is not a number" in caplog.text
    assert "line 5 skipped: time 'yesterday' is not a iso8601 timestamp" in caplog.text
    assert "6 bad row(s) skipped, 2 kept" in caplog.text


def test_a_motion_column_of_zeros_and_ones_takes_nothing_else(tmp_path: Path) -> None:
    mapping = ONE_ROOM_MAP.replace('unit = "count"', 'unit = "0/1"')
    rows = ["2024-03-04T08:00:00,68,45,100000,320,650,1", "2024-03-04T08:05:00,68,45,1e5,1,1,3"]

    trace = Trace.load(one_room(tmp_path, rows, mapping))

    assert trace.skipped == 1 and trace.samples[0].environment.motion is True


def test_a_missing_column_is_named_with_the_map_key(tmp_path: Path) -> None:
    path = one_room(tmp_path, ["2024-03-04T08:00:00,68,45,100000,320,650,0"])
    map_beside(path).write_text(ONE_ROOM_MAP.replace('column = "co2"', 'column = "CO2"'))

    with pytest.raises(TraceError, match=r"no column 'CO2' \(co2.column in .*room.toml\)"):
        Trace.load(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m.replace('unit = "F"', 'unit = "R"'),
            "temperature.unit must be one of C, F, K",
        ),
        (lambda m: m.replace('format = "iso8601"', 'format = "excel"'), "timestamp.format"),
        (lambda m: m.replace('[light]\ncolumn = "lux"\n', ""), r"\[light\] is required"),
        (lambda m: m + 'colour = "red"\n', "unknown key motion.colour"),
    ],
)
def test_a_bad_map_is_refused_with_the_key_it_got_wrong(
    tmp_path: Path, change: object, message: str
) -> None:
    path = one_room(tmp_path, ["2024-03-04T08:00:00,68,45,100000,320,650,0"])
    map_beside(path).write_text(change(ONE_ROOM_MAP))  # type: ignore[operator]

    with pytest.raises(TraceError, match=message):
        Trace.load(path)


def test_timestamps_that_go_back_stop_the_trace_at_their_line(tmp_path: Path) -> None:
    path = one_room(
        tmp_path,
        [
            "2024-03-04T08:00:00,68,45,100000,320,650,0",
            "2024-03-04T08:10:00,68,45,100000,320,650,0",
            "2024-03-04T08:05:00,68,45,100000,320,650,0",
        ],
    )
    with pytest.raises(TraceError, match=r"line 4: .* is not after line 3's .* sorted by time"):
        Trace.load(path)


def test_rows_of_several_devices_need_only_be_sorted_per_device(tmp_path: Path) -> None:
    # Prepare: the generator writes one room after the other, each in time order
    path = recorded(tmp_path, rooms=2, days=1)
    # Execute
    trace = Trace.load(path)
    # Assert
    assert len(trace.devices()) == 2
    for device in trace.devices():
        stamps = [s.timestamp for s in trace.select(device).samples]
        assert stamps == sorted(stamps) and stamps[0] == MONDAY_2024_01_08 + INTERVAL


def test_values_beyond_a_parts_range_become_the_faults_the_part_gives(tmp_path: Path) -> None:
    # Prepare: 302 F (150 C) is beyond the BME280's -40..85 degC, -2000 ppm drives the CO2
    # output below 0 V (ADC code 0), 120 % humidity saturates the compensation (from 97 %,
    # not to trip the rate limit)
    path = one_room(
        tmp_path,
        [
            "2024-03-04T08:00:00,68,97,100000,320,650,0",
            "2024-03-04T08:05:00,302,97,100000,320,650,0",
            "2024-03-04T08:10:00,68,97,100000,320,-2000,0",
            "2024-03-04T08:15:00,68,120,100000,320,650,0",
        ],
    )
    # Execute
    readings = replay(Trace.load(path))
    # Assert
    assert readings[0].valid
    (fault,) = readings[1].faults
    assert (fault.sensor, fault.status) == ("bme280", Status.SPIKE)
    (fault,) = readings[2].faults
    assert (fault.sensor, fault.status) == ("co2", Status.MISSING)
    assert readings[3].valid and readings[3].humidity_pct == 100.0


# --- The trace backend -------------------------------------------------------------------------


def agent_config(tmp_path: Path, sensors: str) -> AgentConfig:
    text = f"""
task = "0x{"ab" * 32}"
[device]
key = "device.key"
state = "state"
[broker]
host = "127.0.0.1"
[chain]
rpc = "http://127.0.0.1:8545"
contract = "0x{"12" * 20}"
[sensors]
{sensors}
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return AgentConfig.load(path)


def test_the_trace_backend_replays_a_devices_rows_then_starts_again(tmp_path: Path) -> None:
    # Prepare: one room's first day, read in simulated time 600 times faster than recorded
    path = recorded(tmp_path, rooms=2, days=2)
    trace = Trace.load(path)
    office = trace.devices()[1]
    part = trace.select(office, ["2024-01-08"])
    config = agent_config(
        tmp_path,
        f'hardware = "trace"\ntrace = "rooms.csv"\ntrace_device = "{office}"\n'
        'trace_days = ["2024-01-08"]\ntime_scale = 600\nhistory = 10',
    )
    # Execute
    sensors = load_backend("trace")(config)
    try:
        rest = [sensors.read() for _ in range(len(part.samples) - 10 + 2)]
    finally:
        sensors.close()
    # Assert
    assert sensors.period == INTERVAL / 600
    played = sensors.history + rest
    for reading, sample in zip(played, part.samples, strict=False):
        assert_read_back(reading, sample)
    span = part.samples[-1].timestamp - part.samples[0].timestamp + INTERVAL
    again = played[len(part.samples) :]
    assert [r.timestamp for r in again] == [s.timestamp + span for s in part.samples[:2]]
    assert [r.co2_ppm for r in again] == [r.co2_ppm for r in played[:2]]


def test_a_device_replays_one_devices_rows(tmp_path: Path) -> None:
    recorded(tmp_path, rooms=2, days=1)
    config = agent_config(tmp_path, 'hardware = "trace"\ntrace = "rooms.csv"')

    with pytest.raises(TraceError, match=r"2 devices: a device replays one \(sensors.trace_device"):
        load_backend("trace")(config)


@pytest.mark.parametrize(
    "sensors, message",
    [
        ('hardware = "trace"', 'sensors.trace goes with sensors.hardware = "trace"'),
        ('hardware = "simulated"\ntrace = "rooms.csv"', "sensors.trace goes with"),
        ('hardware = "trace"\ntrace_device = "a"', "need sensors.trace"),
        ('hardware = "trace"\ntrace = "a.csv"\ntrace_days = [1]', "list of dates"),
    ],
)
def test_trace_settings_are_checked_with_the_configuration(
    tmp_path: Path, sensors: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        agent_config(tmp_path, sensors)


# --- Splitting a trace across the demo's devices -----------------------------------------------


def test_days_are_dealt_round_robin_and_the_last_day_is_held_out(tmp_path: Path) -> None:
    # Prepare: one room over five days (the device column is not mapped)
    path = recorded(tmp_path, rooms=1, days=5)
    mapping = TraceMap.load(map_beside(path))
    one_source = TraceMap(mapping.timestamp, mapping.timestamp_format, mapping.columns)
    one_source.write(tmp_path / "one.toml")
    # Execute
    data = RecordedTrace.split(path, "day", 2, map_path=tmp_path / "one.toml")
    # Assert
    assert [part.days for part in data.parts] == [
        ("2024-01-08", "2024-01-10"),
        ("2024-01-09", "2024-01-11"),
    ]
    assert {s.day for s in data.test.samples} == {"2024-01-12"}
    assert data.most_readings == 2 * PER_DAY - 1  # the first day starts at 00:05
    assert "held out: the last day" in data.note
    # each device's sensors table is a configuration the trace backend replays its part from
    for index, part in enumerate(data.parts):
        table = data.sensors(index, 0.05, window=data.most_readings)
        lines = "\n".join(f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}"
                          for k, v in table.items() if v is not None)  # fmt: skip
        sensors = load_backend("trace")(agent_config(tmp_path, lines))
        sensors.close()
        assert [r.timestamp for r in sensors.history] == [
            s.timestamp for s in part.trace.samples[: data.most_readings]
        ]
        assert sensors.period == pytest.approx(0.05)


def test_a_device_column_split_gives_each_source_its_own_device(tmp_path: Path) -> None:
    path = recorded(tmp_path, rooms=3, days=3)
    test_path = tmp_path / "held-out" / "rooms.csv"
    test_path.parent.mkdir()
    record(test_path, make_fleet(3, seed=12, start=MONDAY_2024_01_08 + 7 * DAY), 100, INTERVAL)

    data = RecordedTrace.split(path, "device-column", 5, test_path)

    assert data.devices == 3
    assert [part.device for part in data.parts] == sorted(Trace.load(path).devices())
    assert all(len(part.trace.samples) == 3 * PER_DAY - 1 for part in data.parts)
    assert len(data.test_set()) == 3 * 100
    assert len(data.pooled(rounds=1, window=100)) == 3 * (3 * PER_DAY - 1)


def test_a_split_that_cannot_be_made_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="split it with --split-by device-column"):
        RecordedTrace.split(recorded(tmp_path, rooms=2, days=3), "day", 2)
    path = recorded(tmp_path, rooms=1, days=3)
    with pytest.raises(TraceError, match="2 day\\(s\\) cannot be dealt to 4 devices"):
        RecordedTrace.split(path, "day", 4, map_path=_without_device(path))
    with pytest.raises(TraceError, match="maps no \\[device\\] column"):
        RecordedTrace.split(path, "device-column", 2, map_path=_without_device(path))


def _without_device(path: Path) -> Path:
    mapping = TraceMap.load(map_beside(path))
    other = path.with_name("no-device.toml")
    TraceMap(mapping.timestamp, mapping.timestamp_format, mapping.columns).write(other)
    return other


# --- truscl demo --data ------------------------------------------------------------------------


def test_the_trace_options_of_truscl_demo_need_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--split-by", "device-column"]) == 1
    assert "--split-by, --test and --map go with --data" in capsys.readouterr().err


@pytest.mark.slow
def test_truscl_demo_runs_on_a_recorded_trace(tmp_path: Path) -> None:
    # Prepare: one room, three days; two devices get a day each, the third is held out
    path = tmp_path / "room.csv"
    record(path, make_fleet(1, seed=5), 3 * PER_DAY - 1, INTERVAL)
    _without_device(path).replace(map_beside(path))
    out = tmp_path / "summary.json"
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "truscl.cli", "demo", "--data", str(path),
         "--devices", "2", "--rounds", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    # Assert
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2]
    assert all(row["participants"] == 2 for row in summary["rounds"])
    assert 0.0 < summary["final_accuracy"] <= 1.0 and 0.0 < summary["baseline_accuracy"] <= 1.0
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 2
    assert "held out: the last day of each source (2024-01-10)" in result.stdout


@pytest.mark.slow
def test_the_in_process_demo_runs_on_a_trace_split_by_its_device_column(tmp_path: Path) -> None:
    # Prepare: two rooms over three days, the last one held out
    config = DemoConfig(
        devices=5,
        rounds=2,
        in_process=True,
        data=recorded(tmp_path, rooms=2, days=3),
        split_by="device-column",
        workdir=tmp_path / "run",
    )
    out = io.StringIO()
    # Execute
    summary = run_demo(config, out)
    # Assert
    assert summary["devices"] == 2
    assert [row["participants"] for row in summary["rounds"]] == [2, 2]
    assert 0.0 < summary["final_accuracy"] <= 1.0 and 0.0 < summary["baseline_accuracy"] <= 1.0
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 2
    assert "one device per value of column 'device' (2 devices)" in out.getvalue()
