"""``truscl aggregator run``: the aggregator as a service.

It serves one task: it checks that the chain names this service's key as the task's aggregator,
takes the task's terms from its archive or the broker (checked against the chain), then opens a
round for every model the owner releases, until the task's last round or SIGTERM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from truscl.chain import ChainClient
from truscl.chain.node import connect
from truscl.errors import ConfigError
from truscl.keyfile import load_or_create_account
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.config import AggregatorConfig

log = logging.getLogger(__name__)

TERMS_PATIENCE_S = 30.0  # how long to wait for the retained terms before saying so in the log


def run_aggregator(
    config: AggregatorConfig, stop: threading.Event, ready: Callable[[], None] | None = None
) -> None:
    account = load_or_create_account(config.key)
    chain = ChainClient.at(connect(config.chain.rpc), config.chain.contract, account)
    record = chain.task(bytes.fromhex(config.task[2:]))
    if record.aggregator != account.address:
        raise ConfigError(
            f"task {config.task} names {record.aggregator} as its aggregator, "
            f"but {config.key} holds the key of {account.address}"
        )
    aggregator = Aggregator(
        task=config.task,
        chain=chain,
        archive=Archive(config.archive),
        broker=config.broker,
        expected=config.expected_devices,
    )
    aggregator.start()
    try:
        while not aggregator.wait_for_terms(TERMS_PATIENCE_S) and not stop.is_set():
            log.warning(
                "aggregator: still waiting for the task's spec and context on %s",
                config.broker.address,
            )
        if ready is not None:
            ready()
        stop.wait()
    finally:
        aggregator.stop()
        log.info("aggregator: stopped")
