"""``truscl aggregator run``: the aggregator as a service.

It serves one task: it checks that the chain names this service's key as the task's aggregator,
takes the task's terms from its archive or the broker (checked against the chain), then opens a
round for every model the owner releases, until the task's last round or SIGTERM.

With ``workers = N`` (N > 1) the task's updates are shared by N processes (shards: see
:mod:`server.aggregator`): this one is shard 0, and once it has the terms it starts shards 1 to
N-1 as its children. They die with it (``PR_SET_PDEATHSIG``); if one of them ends, the service
stops with an error, so that systemd restarts it whole. Each shard's loop beats a heartbeat in
shared memory that this process's watchdog watches with its own loop's: a shard that hangs
(alive, connected, yet taking nothing) stops the pings, and systemd restarts the service as it
would for a hung thread. A hung shard would otherwise hold the round's close forever: shard 0
waits for every shard's partial sum.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
from contextlib import ExitStack
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from truscl import logs, metrics
from truscl.chain import ChainClient
from truscl.chain.rpc import connect
from truscl.errors import ConfigError, TrusclError
from truscl.keyfile import load_account
from truscl.metrics import WorkerCounts
from truscl.server.aggregator import Aggregator, Shard
from truscl.server.archive import Archive
from truscl.server.config import AggregatorConfig
from truscl.server.figures import TaskFigureReader
from truscl.server.status_page import status_server
from truscl.systemd import Heartbeat, supervise

log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1  # prctl(2)
SHARD_STOP_S = 15.0  # a shard that has not stopped this long after SIGTERM is killed


class ShardFailed(TrusclError, RuntimeError):
    """A shard of the aggregator ended while the service ran."""


def _aggregator(config: AggregatorConfig, shard: Shard, heartbeat: Heartbeat) -> Aggregator:
    account = load_account(config.key)
    chain = ChainClient.at(connect(config.chain.rpc), config.chain.contract, account)
    record = chain.task(bytes.fromhex(config.task[2:]))
    if record.aggregator != account.address:
        raise ConfigError(
            f"task {config.task} names {record.aggregator} as its aggregator, "
            f"but {config.key} holds the key of {account.address}"
        )
    return Aggregator(
        task=config.task,
        chain=chain,
        archive=Archive(config.archive),
        broker=config.broker.worker(shard.index) if shard.index else config.broker,
        expected=config.expected_devices,
        heartbeat=heartbeat,
        shard=shard,
    )


def run_aggregator(config: AggregatorConfig, stop: threading.Event) -> None:
    for index in range(1, config.workers):
        login = config.broker.worker(index)
        if login.password_file is not None and not login.password_file.is_file():
            raise ConfigError(
                f"workers = {config.workers}: worker {index} logs in as {login.username} with "
                f"{login.password_file}, which is missing (truscl broker provision "
                f"--aggregator-workers {config.workers} writes it beside the aggregator's)"
            )
    heartbeat = Heartbeat("aggregator")
    aggregator = _aggregator(config, Shard(0, config.workers), heartbeat)
    beats = [heartbeat]
    shards: list[BaseProcess] = []
    failed: list[str] = []
    counts = WorkerCounts() if config.workers > 1 and config.metrics is not None else None
    with ExitStack() as running:
        if config.metrics is not None:
            reader = TaskFigureReader(  # a connection of its own; read-only: no key
                ChainClient.at(connect(config.chain.rpc), config.chain.contract),
                Archive(config.archive),
                config.task,
            )
            page = counts.page if counts is not None else metrics.metrics_page
            running.enter_context(status_server(reader, config.metrics, page))
        aggregator.start()  # connected to the broker when it returns
        running.callback(_stop_shards, shards)
        if config.workers > 1:
            while not aggregator.wait_for_terms(1.0):  # the shards read them from the archive
                if stop.is_set():
                    break
            else:
                shards.extend(_start_shards(config, beats, counts))
                threading.Thread(
                    target=_watch_shards, args=(shards, stop, failed), daemon=True
                ).start()
        try:
            supervise(stop, beats, status=f"serving task {config.task}")
        finally:
            aggregator.stop()
            log.info("aggregator: stopped")
    if failed:
        raise ShardFailed(failed[0])


def _start_shards(
    config: AggregatorConfig, beats: list[Heartbeat], counts: WorkerCounts | None
) -> list[BaseProcess]:
    """Shards 1 to N-1, each in a process; their heartbeats join ``beats``, their counters
    ``counts`` (served at ``/metrics``) if there is one."""
    context = multiprocessing.get_context("spawn")  # this process has threads: no fork
    level, fmt = logs.current()
    shards: list[BaseProcess] = []
    for index in range(1, config.workers):
        beat = Heartbeat.shared(f"shard-{index}")
        beats.append(beat)
        pipe = None if counts is None else counts.pipe(index)
        shard = context.Process(
            target=_run_shard,
            args=(config, index, level, fmt, beat.cell, pipe),
            name=f"truscl-aggregator-shard-{index}",
        )
        shard.start()
        if pipe is not None:
            pipe.close()  # the shard's alone now: its reader here sees the end once it ends
        shards.append(shard)
    log.info("aggregator: started shards 1 to %d", config.workers - 1)
    return shards


def _watch_shards(shards: list[BaseProcess], stop: threading.Event, failed: list[str]) -> None:
    """Stop the service if a shard ends while it runs."""
    multiprocessing.connection.wait([shard.sentinel for shard in shards])
    if stop.is_set():
        return
    ended = next(shard for shard in shards if not shard.is_alive())
    failed.append(f"{ended.name} ended with code {ended.exitcode}; the service stops to restart")
    log.error("aggregator: %s", failed[0])
    stop.set()


def _stop_shards(shards: list[BaseProcess]) -> None:
    for shard in shards:
        if shard.is_alive():
            shard.terminate()  # SIGTERM: it stops as the service would
    for shard in shards:
        shard.join(SHARD_STOP_S)
        if shard.is_alive():
            shard.kill()
            shard.join()


def _run_shard(
    config: AggregatorConfig,
    index: int,
    level: str,
    fmt: str,
    beat: ctypes.c_double,
    counts: Connection | None,
) -> None:
    """A shard's process: it serves the task's updates until SIGTERM or its parent's end; its
    loop beats ``beat``, which its parent's watchdog reads, and its counters go to ``counts``,
    which its parent serves."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    logs.configure(level, fmt)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    heartbeat = Heartbeat(f"shard-{index}", cell=beat)
    shard = _aggregator(config, Shard(index, config.workers), heartbeat)
    shard.start()  # connected and subscribed when it returns
    log.info("aggregator: shard %d of %d takes updates", index, config.workers)
    reporting = threading.Event()
    reporter = threading.Thread(
        target=metrics.report_counts, args=(counts, reporting), name="counts", daemon=True
    )
    if counts is not None:
        reporter.start()
    try:
        while not stop.wait(1.0) and shard.alive:
            pass
    finally:
        shard.stop()
        reporting.set()  # its last counts go too
        if reporter.is_alive():
            reporter.join(SHARD_STOP_S)
        log.info("aggregator: shard %d stopped", index)
