"""Prometheus metrics of the services, served on a local port when their configuration asks.

Each service names a ``[metrics]`` table in its TOML file (``port``, and ``bind``, which is
127.0.0.1 unless set: the figures are for the operator's scraper, not for the network); without
it nothing listens. The aggregator also serves its read-only status page at ``/`` on that port.

Every metric is named ``truscl_*`` and lives in :data:`REGISTRY`, one per process: a process
that hosts several devices labels the per-device figures with the device's address. The
metrics carry counts and figures only, never a key, a ciphertext or a device's data.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from truscl.config import TomlReader

if TYPE_CHECKING:  # multiprocessing only where there are workers: not on a device
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

# The aggregator
UPDATES_ACCEPTED = Counter(
    "truscl_updates_accepted", "Updates the aggregator accepted and counted", registry=REGISTRY
)
UPDATES_REJECTED = Counter(
    "truscl_updates_rejected",
    "Messages and chunks the aggregator refused, by reason",
    ["reason"],
    registry=REGISTRY,
)
BYTES_IN = Counter(
    "truscl_bytes_in", "Bytes of update chunks the aggregator received", registry=REGISTRY
)
ROUND_CLOSE_SECONDS = Histogram(
    "truscl_round_close_seconds",
    "Seconds from a round's opening to its anchored results going out",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
# The aggregator (kind="round") and the owner (kind="model", kind="refusal")
ANCHOR_ATTEMPTS = Counter(
    "truscl_anchor_attempts", "Transactions sent to anchor a round or a model", ["kind"],
    registry=REGISTRY,
)  # fmt: skip
ANCHOR_FAILURES = Counter(
    "truscl_anchor_failures", "Anchoring attempts that failed (retried later)", ["kind"],
    registry=REGISTRY,
)  # fmt: skip
# The owner
MODELS_RELEASED = Counter(
    "truscl_models_released", "Models the owner released", registry=REGISTRY
)  # fmt: skip
ROUNDS_REFUSED = Counter(
    "truscl_rounds_refused", "Rounds whose release the owner refused", registry=REGISTRY
)
# The agent
EPSILON_SPENT = Gauge(
    "truscl_epsilon_spent",
    "Epsilon a device's privacy ledger has spent",
    ["device"],
    registry=REGISTRY,
)
SENSOR_HEALTHY = Gauge(
    "truscl_sensor_healthy",
    "1 while a sensor's readings pass their health checks, 0 when it is faulty",
    ["device", "sensor"],
    registry=REGISTRY,
)
UPDATES_SENT = Counter(
    "truscl_updates_sent", "Updates a device signed and published", ["device"], registry=REGISTRY
)

Page = Callable[[], tuple[bytes, str]]  # body and content type


@dataclass(frozen=True)
class MetricsSettings:
    """The ``[metrics]`` table: where to serve ``/metrics`` (and the aggregator's status page).

    ``explorer`` (the aggregator's only) is a URL template with ``{tx}`` that the status page
    links transaction hashes to, such as ``https://sepolia.etherscan.io/tx/{tx}``."""

    port: int
    bind: str = "127.0.0.1"
    explorer: str | None = None

    @classmethod
    def read(cls, reader: TomlReader, explorer: bool = False) -> MetricsSettings | None:
        """The table's settings, or ``None`` when the file has no ``[metrics]`` table."""
        if "metrics" not in reader.data:
            return None
        table = reader.table("metrics")
        settings = cls(
            port=reader.take(table, "metrics.port", int),
            bind=reader.take(table, "metrics.bind", str, "127.0.0.1"),
            explorer=reader.take(table, "metrics.explorer", str, None) if explorer else None,
        )
        if not 0 <= settings.port <= 65535:
            raise reader.fail("metrics.port must be between 0 and 65535")
        if settings.explorer is not None and "{tx}" not in settings.explorer:
            raise reader.fail("metrics.explorer must contain {tx}")
        return settings


def metrics_page() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


Counts = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample, labels) -> value


def counts() -> Counts:
    """This process's counters, as their ``_total`` samples: what a worker process reports to
    the process that serves ``/metrics`` (:class:`WorkerCounts`)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in REGISTRY.collect()
        if family.type == "counter"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def report_counts(pipe: Connection, stop: threading.Event, every: float = 1.0) -> None:
    """A worker's side of :class:`WorkerCounts`, on a thread of its own until ``stop``: its
    :func:`counts` through ``pipe`` whenever they changed, at most every ``every`` seconds,
    and once more on the way out."""
    sent: Counts | None = None
    while True:
        stopping = stop.wait(every)
        now = counts()
        if now != sent:
            try:
                pipe.send(now)
            except OSError:  # the service is gone: so is whoever would read it
                return
            sent = now
        if stopping:
            return


class WorkerCounts:
    """``/metrics`` of a service whose work is shared by worker processes (the aggregator's
    ``workers = N``): each counter is this process's plus every worker's, as the workers last
    reported them (:func:`report_counts`). A worker's figures stay until the service ends: a
    counter never goes down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[int, Counts] = {}

    def pipe(self, worker: int) -> Connection:
        """The end to hand worker ``worker`` (a ``spawn`` process's argument): what it sends
        there is read on a thread of this process."""
        import multiprocessing

        ours, theirs = multiprocessing.Pipe(duplex=False)
        threading.Thread(
            target=self._read, args=(worker, ours), name=f"counts-{worker}", daemon=True
        ).start()
        return theirs

    def _read(self, worker: int, pipe: Connection) -> None:
        while True:
            try:
                reported = pipe.recv()
            except (EOFError, OSError):  # the worker ended: its last figures stay
                return
            with self._lock:
                self._latest[worker] = reported

    def collect(self) -> Iterator[Metric]:
        """This process's metrics with the workers' counts added (a collector's interface,
        for ``generate_latest``)."""
        workers: collections.Counter[tuple[str, tuple[tuple[str, str], ...]]] = (
            collections.Counter()
        )
        with self._lock:
            for reported in self._latest.values():
                workers.update(reported)
        for family in REGISTRY.collect():
            if family.type == "counter":
                own = {(s.name, tuple(sorted(s.labels.items()))) for s in family.samples}
                family.samples = [
                    s._replace(value=s.value + workers[(s.name, tuple(sorted(s.labels.items())))])
                    for s in family.samples
                ] + [
                    Sample(name, dict(labels), value)
                    for (name, labels), value in workers.items()
                    if name == f"{family.name}_total" and (name, labels) not in own
                ]
            yield family

    def page(self) -> tuple[bytes, str]:
        return generate_latest(self), CONTENT_TYPE_LATEST


class MetricsServer:
    """``/metrics`` and any further read-only pages, over HTTP, on a thread of its own."""

    def __init__(self, settings: MetricsSettings, pages: dict[str, Page] | None = None) -> None:
        routes = {"/metrics": metrics_page, **(pages or {})}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = routes.get(self.path.split("?", 1)[0])
                if page is None:
                    self.send_error(404)
                    return
                try:
                    body, content_type = page()
                except Exception:  # a page that cannot be made now is not the service's end
                    log.exception("metrics: cannot serve %s", self.path)
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: %s %s", self.address_string(), format % args)

        self._server = ThreadingHTTPServer((settings.bind, settings.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics: serving on http://%s:%d/metrics", *self._server.server_address[:2])
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
