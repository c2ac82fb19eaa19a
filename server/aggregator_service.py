"""``truscl aggregator run``: the aggregator as a service.

It serves one task: it checks that the chain names this service's key as the task's aggregator,
takes the task's terms from its archive or the broker (checked against the chain), then opens a
round for every model the owner releases, until the task's last round or SIGTERM.
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack

from truscl.chain import ChainClient
from truscl.chain.rpc import connect
from truscl.errors import ConfigError
from truscl.keyfile import load_account
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.config import AggregatorConfig
from truscl.server.figures import TaskFigureReader
from truscl.server.status_page import status_server
from truscl.systemd import Heartbeat, supervise

log = logging.getLogger(__name__)


def run_aggregator(config: AggregatorConfig, stop: threading.Event) -> None:
    account = load_account(config.key)
    chain = ChainClient.at(connect(config.chain.rpc), config.chain.contract, account)
    record = chain.task(bytes.fromhex(config.task[2:]))
    if record.aggregator != account.address:
        raise ConfigError(
            f"task {config.task} names {record.aggregator} as its aggregator, "
            f"but {config.key} holds the key of {account.address}"
        )
    heartbeat = Heartbeat("aggregator")
    aggregator = Aggregator(
        task=config.task,
        chain=chain,
        archive=Archive(config.archive),
        broker=config.broker,
        expected=config.expected_devices,
        heartbeat=heartbeat,
    )
    with ExitStack() as running:
        if config.metrics is not None:
            reader = TaskFigureReader(  # a connection of its own; read-only: no key
                ChainClient.at(connect(config.chain.rpc), config.chain.contract),
                Archive(config.archive),
                config.task,
            )
            running.enter_context(status_server(reader, config.metrics))
        aggregator.start()  # connected to the broker when it returns
        try:
            supervise(stop, [heartbeat], status=f"serving task {config.task}")
        finally:
            aggregator.stop()
            log.info("aggregator: stopped")
