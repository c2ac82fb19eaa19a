"""The agent's configuration file (TOML), checked strictly before anything starts.

A typo or a wrong type stops the agent with one clear line naming the file and the key, instead
of a device that runs with a default its operator did not mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from truscl.agent.hardware import backend_names
from truscl.agent.health import SENSORS
from truscl.agent.litert import BACKENDS
from truscl.agent.sensors import Wiring
from truscl.config import ADDRESS, TASK, TomlReader
from truscl.errors import ConfigError
from truscl.metrics import MetricsSettings
from truscl.mqtt import BrokerSettings


@dataclass(frozen=True)
class OutputSettings:
    """``[output]``: the pin (BCM) of an LED or relay that shows the predicted occupancy."""

    pin: int
    threshold: float = 0.5
    active_high: bool = True


@dataclass(frozen=True)
class TraceSettings:
    """What the ``trace`` backend replays: a CSV trace, its column map (default: ``FILE.toml``
    beside ``FILE.csv``), and optionally only the rows of one device (the value of the map's
    device column) and of some calendar days (UTC, ``YYYY-MM-DD``)."""

    path: Path
    map: Path | None
    device: str | None
    days: tuple[str, ...] | None

    @classmethod
    def read(cls, reader: TomlReader, sensors: dict[str, Any]) -> TraceSettings | None:
        path = reader.optional_path(sensors, "sensors.trace")
        trace_map = reader.optional_path(sensors, "sensors.trace_map")
        device = reader.take(sensors, "sensors.trace_device", str, None)
        days = reader.take(sensors, "sensors.trace_days", list, None)
        if days is not None and not all(isinstance(day, str) for day in days):
            raise reader.fail("sensors.trace_days must be a list of dates (YYYY-MM-DD)")
        if path is None:
            if trace_map is not None or device is not None or days is not None:
                raise reader.fail(
                    "sensors.trace_map, trace_device and trace_days need sensors.trace"
                )
            return None
        return cls(path, trace_map, device, None if days is None else tuple(days))


@dataclass(frozen=True)
class AgentConfig:
    task: str
    key: Path
    state: Path
    name: str | None
    broker: BrokerSettings
    rpc: str
    contract: str
    hardware: str  # "pi", "simulated" or "trace"
    interval: float
    wiring: Wiring
    i2c_bus: int
    room: int
    seed: int
    time_scale: float
    start: float | None  # simulated: epoch second the room's clock starts at (None: now)
    history: int  # simulated, trace: readings the device had already taken when it starts
    metrics: MetricsSettings | None = None  # [metrics]: where to serve /metrics (absent: off)
    parts: tuple[str, ...] = SENSORS  # the sensors fitted: a task needing another is refused
    training: str = "numpy"  # "numpy" (the reference) or "litert"
    output: OutputSettings | None = None  # the occupancy LED or relay, if wired
    trace: TraceSettings | None = None  # trace: the recorded data it replays

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        return cls.read(TomlReader.load(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AgentConfig:
        return cls.read(TomlReader(data, source))

    @classmethod
    def read(cls, reader: TomlReader) -> AgentConfig:
        data, source = reader.data, reader.source
        device = reader.table("device")
        chain, sensors = reader.table("chain"), reader.table("sensors")
        training, output = reader.table("training"), reader.table("output")
        config = cls(
            task=reader.pattern(data, "task", TASK, "0x and 64 hex digits"),
            key=reader.path(device, "device.key"),
            state=reader.path(device, "device.state"),
            name=reader.take(device, "device.name", str, None),
            broker=reader.broker(),
            rpc=reader.take(chain, "chain.rpc", str),
            contract=reader.pattern(chain, "chain.contract", ADDRESS, "an address"),
            hardware=reader.take(sensors, "sensors.hardware", str, "pi"),
            interval=reader.number(sensors, "sensors.interval", 300),
            wiring=Wiring(
                pir_pin=reader.take(sensors, "sensors.pir_pin", int, 4),
                light_channel=reader.take(sensors, "sensors.light_channel", int, 0),
                co2_channel=reader.take(sensors, "sensors.co2_channel", int, 1),
                bme280_address=reader.take(sensors, "sensors.bme280_address", int, 0x76),
            ),
            i2c_bus=reader.take(sensors, "sensors.i2c_bus", int, 1),
            room=reader.take(sensors, "sensors.room", int, 0),
            seed=reader.take(sensors, "sensors.seed", int, 0),
            time_scale=reader.number(sensors, "sensors.time_scale", 1.0),
            start=reader.take(sensors, "sensors.start", (int, float), None),
            history=reader.take(sensors, "sensors.history", int, 0),
            metrics=MetricsSettings.read(reader),
            parts=tuple(reader.take(sensors, "sensors.parts", list, list(SENSORS))),
            training=reader.take(training, "training.backend", str, "numpy"),
            output=None
            if not output
            else OutputSettings(
                pin=reader.take(output, "output.pin", int),
                threshold=reader.number(output, "output.threshold", 0.5),
                active_high=reader.take(output, "output.active_high", bool, True),
            ),
            trace=TraceSettings.read(reader, sensors),
        )
        reader.no_leftovers()
        if config.hardware not in backend_names():
            names = ", ".join(f'"{n}"' for n in backend_names())
            raise ConfigError(f"{source}: sensors.hardware must be one of {names}")
        if (config.hardware == "trace") != (config.trace is not None):
            raise ConfigError(f'{source}: sensors.trace goes with sensors.hardware = "trace"')
        if config.interval <= 0 or config.time_scale <= 0:
            raise ConfigError(f"{source}: sensors.interval and sensors.time_scale must be > 0")
        named = all(isinstance(part, str) for part in config.parts)
        if not named or not set(config.parts) <= set(SENSORS):
            names = ", ".join(f'"{n}"' for n in SENSORS)
            raise ConfigError(f"{source}: sensors.parts may only name {names}")
        if config.room < 0 or config.history < 0:
            raise ConfigError(f"{source}: sensors.room and sensors.history must not be negative")
        if config.training not in BACKENDS:
            names = ", ".join(f'"{n}"' for n in BACKENDS)
            raise ConfigError(f"{source}: training.backend must be one of {names}")
        if config.output is not None:
            if not 0 <= config.output.threshold <= 1:
                raise ConfigError(f"{source}: output.threshold must be within 0 and 1")
            if "pir" in config.parts and config.output.pin == config.wiring.pir_pin:
                raise ConfigError(f"{source}: output.pin is the PIR's pin (sensors.pir_pin)")
        return config
