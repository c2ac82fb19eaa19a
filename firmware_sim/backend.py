"""The ``simulated`` and ``trace`` hardware backends: a simulated room, or a recorded trace,
behind the agent's real drivers.

Registered in the ``truscl.hardware`` entry point group, so ``sensors.hardware = "simulated"``
in an agent's configuration runs the same service on any machine, in simulated time
(``sensors.time_scale`` simulated seconds per real second), from ``sensors.start`` (epoch
seconds; default now) and with ``sensors.history`` readings already taken, as if the device had
been sensing before it joined.

``sensors.hardware = "trace"`` replays the CSV trace ``sensors.trace`` (see
:mod:`truscl.sim.trace`) the same way: ``sensors.history`` rows are read at once, then one row
every trace spacing (its median gap) divided by ``sensors.time_scale``, each reading stamped
with its row's time. ``sensors.trace_device`` and ``sensors.trace_days`` choose the rows of one
device and of some days, so several devices can share one file.
"""

from __future__ import annotations

import time

from truscl.agent.config import AgentConfig
from truscl.agent.hardware import Sensors
from truscl.agent.sensors import Reading, SensorSuite
from truscl.sim.hardware import FakeHardware, SimulatedDevice
from truscl.sim.rooms import Room, make_rooms
from truscl.sim.trace import Trace, TracePlayer


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


def open_trace(config: AgentConfig) -> Sensors:
    settings = config.trace
    assert settings is not None  # the configuration checks that a trace goes with "trace"
    trace = Trace.load(settings.path, settings.map).select(settings.device, settings.days)
    hardware = FakeHardware(config.wiring)
    player = TracePlayer(trace, hardware)
    suite = SensorSuite(hardware.pin_factory, hardware.i2c_bus, config.wiring)

    def read() -> Reading:
        return suite.read(player.advance())

    history = [read() for _ in range(config.history)]
    return Sensors(suite, read, player.spacing / config.time_scale, history)
