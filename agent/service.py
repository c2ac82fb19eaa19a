"""``truscl agent``: the device agent as a long-running service (systemd runs it on a Pi).

It reads the sensors on a fixed cadence (real hardware through gpiozero and smbus2, or a
simulated room for trials), and contributes to every round of its task until its privacy
budget is spent or it is stopped (SIGTERM). Keys and state live under the configured paths.
"""

from __future__ import annotations

import logging
import threading

from truscl.agent.config import AgentConfig
from truscl.agent.device import DeviceAgent
from truscl.agent.hardware import load_backend
from truscl.agent.provision import NO_TASK
from truscl.agent.sampling import Sampler
from truscl.chain import ChainClient
from truscl.chain.rpc import connect
from truscl.errors import ConfigError
from truscl.keyfile import load_or_create_account
from truscl.systemd import Heartbeat, supervise

log = logging.getLogger(__name__)

SAMPLER_CAPACITY = 100_000  # readings kept between two rounds at most (~1 year at 5 min)


def run_agent(config: AgentConfig, stop: threading.Event) -> None:
    if config.task == NO_TASK or int(config.contract, 16) == 0:
        raise ConfigError(
            "the configuration still names no task or no contract: set `task` (from "
            "`truscl owner init`) and `chain.contract` (from `truscl chain deploy`)"
        )
    account = load_or_create_account(config.key)
    chain = ChainClient.at(connect(config.rpc), config.contract)
    sensors = load_backend(config.hardware)(config)
    sampler = Sampler(
        sensors.read,
        sensors.period,
        SAMPLER_CAPACITY,
        history=sensors.history,
        state_folder=config.state,
    ).start()
    heartbeat = Heartbeat("device")
    agent = DeviceAgent(
        account=account,
        task=config.task,
        chain=chain,
        broker=config.broker,
        workdir=config.state,
        collect=sampler.drain,
        name=config.name,
        heartbeat=heartbeat,
    )
    log.info("agent %s (%s) starting for task %s", agent.name, account.address, config.task)
    try:
        agent.start(broker_timeout=None)  # the broker may come later: paho keeps trying
        supervise(stop, [heartbeat], status=f"device {account.address}")
    finally:
        agent.stop()
        sampler.stop()
        sensors.close()
        log.info("agent %s stopped", agent.name)
