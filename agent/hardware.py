"""Hardware backends: how the agent gets its sensors, found by name as gpiozero finds pin factories.

A backend is a callable registered in the ``truscl.hardware`` entry point group that takes the
agent's configuration and returns an open :class:`Sensors`. The agent ships ``pi`` (gpiozero and
smbus2 on a Raspberry Pi); the simulator registers ``simulated``. The agent never imports the
simulator: it asks for a backend by the name in its configuration (``sensors.hardware``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from truscl.agent.sensors import Reading, SensorSuite
from truscl.errors import ConfigError

if TYPE_CHECKING:
    from truscl.agent.config import AgentConfig

GROUP = "truscl.hardware"


@dataclass
class Sensors:
    """An open sensor suite, a function that reads it once, the real seconds between reads,
    and readings taken before the agent started (a simulated device's past)."""

    suite: SensorSuite
    read: Callable[[], Reading]
    period: float
    history: list[Reading] = field(default_factory=list)

    def close(self) -> None:
        self.suite.close()


Backend = Callable[["AgentConfig"], Sensors]


def backend_names() -> list[str]:
    """Names of the installed backends (the values ``sensors.hardware`` may take)."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_backend(name: str) -> Backend:
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        known = ", ".join(backend_names()) or "none"
        raise ConfigError(f"no hardware backend named {name!r} (installed: {known})")
    backend: Backend = found[0].load()
    return backend


def open_pi(config: AgentConfig) -> Sensors:
    """The sensors of a Raspberry Pi: gpiozero's configured pin factory and an I2C bus."""
    from gpiozero import Device
    from smbus2 import SMBus

    Device.ensure_pin_factory()
    assert Device.pin_factory is not None
    suite = SensorSuite(
        Device.pin_factory, SMBus(config.i2c_bus), config.wiring, parts=config.parts
    )
    return Sensors(suite, lambda: suite.read(time.time()), config.interval)
