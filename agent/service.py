"""``truscl agent``: the device agent as a long-running service (systemd runs it on a Pi).

It reads the sensors on a fixed cadence (real hardware through gpiozero and smbus2, or a
simulated room for trials), and contributes to every round of its task until its privacy
budget is spent or it is stopped (SIGTERM). Keys and state live under the configured paths.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

from truscl import metrics
from truscl.agent.config import AgentConfig
from truscl.agent.device import DeviceAgent
from truscl.agent.hardware import load_backend
from truscl.agent.health import SensorHealth, Status
from truscl.agent.litert import ModelRuntime
from truscl.agent.output import OccupancyOutput
from truscl.agent.provision import NO_TASK
from truscl.agent.sampling import Sampler, SensingThread
from truscl.chain.reader import RpcReader
from truscl.errors import ConfigError
from truscl.keyfile import load_or_create_signing_key
from truscl.systemd import Heartbeat, supervise

log = logging.getLogger(__name__)

SAMPLER_CAPACITY = 100_000  # readings kept between two rounds at most (~1 year at 5 min)


def run_agents(configs: Sequence[AgentConfig], stop: threading.Event) -> None:
    """One agent per configuration, in this one process, until ``stop``.

    A Pi runs one; a simulator or a gateway may host many devices in one process (each keeps
    its own key, state folder, sensors and broker session; one thread reads all their sensors,
    one after another). The watchdog is fed only while every agent's loop turns.
    """
    for config in configs:
        if config.task == NO_TASK or int(config.contract, 16) == 0:
            raise ConfigError(
                "the configuration still names no task or no contract: set `task` (from "
                "`truscl owner init`) and `chain.contract` (from `truscl chain deploy`)"
            )
    with ExitStack() as running:
        for settings in {c.metrics for c in configs if c.metrics is not None}:
            running.enter_context(metrics.MetricsServer(settings))
        sensing = None
        if len(configs) > 1:  # one thread reads every device's sensors, in turn
            sensing = SensingThread()
            running.callback(sensing.stop)  # after every agent has stopped (last in, first out)
        heartbeats = [running.enter_context(_running_agent(config, sensing)) for config in configs]
        names = ", ".join(heartbeat.name for heartbeat in heartbeats)
        supervise(stop, heartbeats, status=f"device {names}")


@contextmanager
def _running_agent(config: AgentConfig, sensing: SensingThread | None) -> Iterator[Heartbeat]:
    account = load_or_create_signing_key(config.key)  # signs messages only: no eth-account
    chain = RpcReader(config.rpc, config.contract)  # a device reads; web3 stays off it
    sensors = load_backend(config.hardware)(config)
    sampler: Sampler | None = None
    agent: DeviceAgent | None = None
    output: OccupancyOutput | None = None
    runtime = ModelRuntime(config.training)
    heartbeat = Heartbeat(account.address)
    try:
        if config.output is not None:
            output = OccupancyOutput(
                config.output.pin,
                sensors.suite.pin_factory,
                runtime,
                threshold=config.output.threshold,
                active_high=config.output.active_high,
            )
        sampler = Sampler(
            sensors.read,
            sensors.period,
            SAMPLER_CAPACITY,
            history=sensors.history,
            state_folder=config.state,
            thread=sensing,
        ).start()
        agent = DeviceAgent(
            account=account,
            task=config.task,
            chain=chain,
            broker=config.broker,
            workdir=config.state,
            collect=sampler.drain,
            name=config.name,
            heartbeat=heartbeat,
            runtime=runtime,
            output=output,
            sensors=sensors.suite.parts,
        )
        log.info("agent %s (%s) starting for task %s", agent.name, account.address, config.task)
        _export(account.address, agent, sampler)
        agent.start(broker_timeout=None)  # the broker may come later: paho keeps trying
        yield heartbeat
    finally:
        if agent is not None:
            agent.stop()
            log.info("agent %s stopped", agent.name)
        if sampler is not None:
            sampler.stop()
        if output is not None:
            output.close()
        sensors.close()
        chain.close()


def _export(address: str, agent: DeviceAgent, sampler: Sampler) -> None:
    """The device's figures as metrics, read when scraped: epsilon spent, sensors' health."""
    metrics.EPSILON_SPENT.labels(address).set_function(agent.epsilon)
    for name, health in sampler.health.sensors.items():
        metrics.SENSOR_HEALTHY.labels(address, name).set_function(partial(_healthy, health))


def _healthy(health: SensorHealth) -> float:
    return float(health.status is Status.OK)
