"""Prometheus metrics of the services, served on a local port when their configuration asks.

Each service names a ``[metrics]`` table in its TOML file (``port``, and ``bind``, which is
127.0.0.1 unless set: the figures are for the operator's scraper, not for the network); without
it nothing listens. The aggregator also serves its read-only status page at ``/`` on that port.

Every metric is named ``truscl_*`` and lives in :data:`REGISTRY`, one per process: a process
that hosts several devices labels the per-device figures with the device's address. The
metrics carry counts and figures only, never a key, a ciphertext or a device's data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from truscl.config import TomlReader

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
