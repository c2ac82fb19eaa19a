"""``truscl agent``: the device agent as a long-running service (systemd runs it on a Pi).

It reads the sensors on a fixed cadence (real hardware through gpiozero and smbus2, or a
simulated room for trials), and contributes to every round of its task until its privacy
budget is spent or it is stopped (SIGTERM). Keys and state live under the configured paths.
"""

from __future__ import annotations

import logging
import threading

from web3 import Web3

from truscl.agent.config import AgentConfig
from truscl.agent.device import DeviceAgent
from truscl.agent.hardware import load_backend
from truscl.agent.sampling import Sampler
from truscl.chain import ChainClient
from truscl.errors import ChainError
from truscl.keyfile import load_or_create_account
from truscl.systemd import Heartbeat, supervise

log = logging.getLogger(__name__)

SAMPLER_CAPACITY = 100_000  # readings kept between two rounds at most (~1 year at 5 min)


def run_agent(config: AgentConfig, stop: threading.Event) -> None:
    account = load_or_create_account(config.key)
    w3 = Web3(Web3.HTTPProvider(config.rpc, request_kwargs={"timeout": 10}))
    if not w3.is_connected():
        raise ChainError(f"no JSON-RPC node answers at {config.rpc}")
    chain = ChainClient.at(w3, config.contract)
    sensors = load_backend(config.hardware)(config)
    sampler = Sampler(
        sensors.read, sensors.period, SAMPLER_CAPACITY, history=sensors.history
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
