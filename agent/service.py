"""``truscl agent``: the device agent as a long-running service (systemd runs it on a Pi).

It reads the sensors on a fixed cadence (real hardware through gpiozero and smbus2, or a
simulated room for trials), and contributes to every round of its task until its privacy
budget is spent or it is stopped (SIGTERM). Keys and state live under the configured paths.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from web3 import Web3

from agent.config import AgentConfig
from agent.device import DeviceAgent
from agent.sampling import Sampler
from agent.sensors import Reading, SensorSuite
from truscl.chain import ChainClient
from truscl.errors import ChainError
from truscl.keyfile import load_or_create_account

log = logging.getLogger(__name__)

SAMPLER_CAPACITY = 100_000  # readings kept between two rounds at most (~1 year at 5 min)


def open_sensors(config: AgentConfig) -> tuple[SensorSuite, Callable[[], Reading], float]:
    """The sensor suite, a function reading it once, and the real seconds between reads."""
    if config.hardware == "pi":
        from gpiozero import Device
        from smbus2 import SMBus

        Device.ensure_pin_factory()
        assert Device.pin_factory is not None
        suite = SensorSuite(Device.pin_factory, SMBus(config.i2c_bus), config.wiring)
        return suite, lambda: suite.read(time.time()), config.interval

    from firmware_sim.hardware import SimulatedDevice
    from firmware_sim.rooms import Room, make_rooms

    profile = make_rooms(config.room + 1, config.seed)[config.room]
    simulated = SimulatedDevice(
        Room(profile, seed=config.seed * 1000 + config.room, start=time.time()),
        seed=config.seed * 1000 + 500 + config.room,
        wiring=config.wiring,
    )
    suite = SensorSuite(simulated.pin_factory, simulated.i2c_bus, config.wiring)

    def read() -> Reading:
        simulated.step(config.interval)
        return suite.read(simulated.now)

    return suite, read, config.interval / config.time_scale


def run_agent(config: AgentConfig, stop: threading.Event) -> None:
    account = load_or_create_account(config.key)
    w3 = Web3(Web3.HTTPProvider(config.rpc, request_kwargs={"timeout": 10}))
    if not w3.is_connected():
        raise ChainError(f"no JSON-RPC node answers at {config.rpc}")
    chain = ChainClient.at(w3, config.contract)
    suite, read, period = open_sensors(config)
    sampler = Sampler(read, period, SAMPLER_CAPACITY).start()
    agent = DeviceAgent(
        account=account,
        task=config.task,
        chain=chain,
        host=config.broker_host,
        port=config.broker_port,
        workdir=config.state,
        collect=sampler.drain,
        name=config.name,
    )
    log.info("agent %s (%s) starting for task %s", agent.name, account.address, config.task)
    try:
        agent.start(broker_timeout=None)
        stop.wait()
    finally:
        agent.stop()
        sampler.stop()
        suite.close()
        log.info("agent %s stopped", agent.name)
