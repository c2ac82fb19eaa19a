"""The ``simulated`` hardware backend: a simulated room behind the agent's real drivers.

Registered in the ``truscl.hardware`` entry point group, so ``sensors.hardware = "simulated"``
in an agent's configuration runs the same service on any machine, in simulated time
(``sensors.time_scale`` simulated seconds per real second), from ``sensors.start`` (epoch
seconds; default now) and with ``sensors.history`` readings already taken, as if the device had
been sensing before it joined.
"""

from __future__ import annotations

import time

from truscl.agent.config import AgentConfig
from truscl.agent.hardware import Sensors
from truscl.agent.sensors import Reading, SensorSuite
from truscl.sim.hardware import SimulatedDevice
from truscl.sim.rooms import Room, make_rooms


def open_simulated(config: AgentConfig) -> Sensors:
    profile = make_rooms(config.room + 1, config.seed)[config.room]
    start = time.time() if config.start is None else config.start
    simulated = SimulatedDevice(
        Room(profile, seed=config.seed * 1000 + config.room, start=start),
        seed=config.seed * 1000 + 500 + config.room,
        wiring=config.wiring,
    )
    suite = SensorSuite(simulated.pin_factory, simulated.i2c_bus, config.wiring, parts=config.parts)

    def read() -> Reading:
        simulated.step(config.interval)
        return suite.read(simulated.now)

    history = [read() for _ in range(config.history)]
    return Sensors(suite, read, config.interval / config.time_scale, history)
