"""The agent's configuration file (TOML), checked strictly before anything starts.

A typo or a wrong type stops the agent with one clear line naming the file and the key, instead
of a device that runs with a default its operator did not mean.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from truscl.agent.hardware import backend_names
from truscl.agent.sensors import Wiring
from truscl.errors import ConfigError

T = TypeVar("T")
_REQUIRED: Any = object()
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_TASK = re.compile(r"0x[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class AgentConfig:
    task: str
    key: Path
    state: Path
    name: str | None
    broker_host: str
    broker_port: int
    rpc: str
    contract: str
    hardware: str  # "pi" or "simulated"
    interval: float
    wiring: Wiring
    i2c_bus: int
    room: int
    seed: int
    time_scale: float

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AgentConfig:
        reader = _Reader(data, source)
        device, broker = reader.table("device"), reader.table("broker")
        chain, sensors = reader.table("chain"), reader.table("sensors")
        config = cls(
            task=reader.pattern(data, "task", _TASK, "0x and 64 hex digits"),
            key=Path(reader.take(device, "device.key", str)),
            state=Path(reader.take(device, "device.state", str)),
            name=reader.take(device, "device.name", str, None),
            broker_host=reader.take(broker, "broker.host", str),
            broker_port=reader.take(broker, "broker.port", int, 1883),
            rpc=reader.take(chain, "chain.rpc", str),
            contract=reader.pattern(chain, "chain.contract", _ADDRESS, "an address"),
            hardware=reader.take(sensors, "sensors.hardware", str, "pi"),
            interval=float(reader.take(sensors, "sensors.interval", (int, float), 300)),
            wiring=Wiring(
                pir_pin=reader.take(sensors, "sensors.pir_pin", int, 4),
                light_channel=reader.take(sensors, "sensors.light_channel", int, 0),
                co2_channel=reader.take(sensors, "sensors.co2_channel", int, 1),
                bme280_address=reader.take(sensors, "sensors.bme280_address", int, 0x76),
            ),
            i2c_bus=reader.take(sensors, "sensors.i2c_bus", int, 1),
            room=reader.take(sensors, "sensors.room", int, 0),
            seed=reader.take(sensors, "sensors.seed", int, 0),
            time_scale=float(reader.take(sensors, "sensors.time_scale", (int, float), 1.0)),
        )
        reader.no_leftovers()
        if config.hardware not in backend_names():
            names = ", ".join(f'"{n}"' for n in backend_names())
            raise ConfigError(f"{source}: sensors.hardware must be one of {names}")
        if not 0 < config.broker_port < 65536:
            raise ConfigError(f"{source}: broker.port must be a TCP port")
        if config.interval <= 0 or config.time_scale <= 0:
            raise ConfigError(f"{source}: sensors.interval and sensors.time_scale must be > 0")
        if config.room < 0:
            raise ConfigError(f"{source}: sensors.room must not be negative")
        return config


class _Reader:
    """Takes keys out of the parsed TOML so that whatever is left over is an unknown key."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source
        self.seen: set[str] = set()

    def table(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: [{name}] must be a table")
        self.seen.add(name)
        return value

    def take(
        self,
        table: dict[str, Any],
        dotted: str,
        kind: type[T] | tuple[type, ...],
        default: Any = _REQUIRED,
    ) -> Any:
        key = dotted.rsplit(".", 1)[-1]
        self.seen.add(dotted)
        if key not in table:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: {dotted} is required")
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{self.source}: {dotted} has the wrong type ({value!r})")
        return value

    def pattern(self, table: dict[str, Any], dotted: str, regex: re.Pattern[str], what: str) -> str:
        value: str = self.take(table, dotted, str)
        if not regex.fullmatch(value):
            raise ConfigError(f"{self.source}: {dotted} must be {what}")
        return value

    def no_leftovers(self) -> None:
        for name, value in self.data.items():
            if isinstance(value, dict):
                unknown = [f"{name}.{k}" for k in value if f"{name}.{k}" not in self.seen]
            else:
                unknown = [] if name in self.seen else [name]
            if unknown:
                raise ConfigError(f"{self.source}: unknown key {unknown[0]}")
