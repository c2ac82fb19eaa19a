"""The services' Prometheus metrics, scraped over HTTP, and what logs and metrics never hold."""

from __future__ import annotations

import base64
import io
import json
import logging
import multiprocessing
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from conftest import FleetRun
from prometheus_client.parser import text_string_to_metric_families
from test_aggregator import Deployment, deployment, signed_update

from truscl import logs, metrics
from truscl.agent.config import AgentConfig
from truscl.errors import ConfigError, ProtocolError
from truscl.metrics import MetricsSettings, WorkerCounts
from truscl.mqtt import MqttLink
from truscl.server.archive import Archive
from truscl.server.config import AggregatorConfig, OwnerConfig
from truscl.server.figures import TaskFigureReader
from truscl.server.status_page import status_server
from truscl.wire import TaskTopics, split_update
from truscl.wire.receipt import Receipt

__all__ = ["deployment"]  # the aggregator on a real broker and the in-process EVM

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def a_round_with_a_forgery(d: Deployment) -> tuple[list[Receipt], int]:
    """A forged update, then the two registered devices' honest ones, which close round 1;
    the receipts, once round 1 is anchored, and the bytes sent."""
    topics = TaskTopics(d.spec.task)
    receipts: queue.Queue[Receipt] = queue.Queue()
    honest, other, _ = d.devices
    good = [signed_update(d, honest), signed_update(d, other)]
    forged = replace(good[1], signature=good[0].signature)  # other's update, honest's signature

    def on_message(topic: str, payload: bytes) -> None:
        try:
            receipts.put(Receipt.decode(payload))
        except ProtocolError:  # the inclusion proofs that follow the round's anchor
            pass

    link = MqttLink(
        "test-device",
        d.broker.settings,
        on_message=on_message,
        subscriptions=[topics.base + "/receipts/+"],
        max_message=1 << 20,
    ).start()
    sent = 0
    try:
        for sender, update in ((other, forged), (honest, good[0]), (other, good[1])):
            for chunk in split_update(update, d.spec.max_message):
                link.publish(topics.updates(sender.address), chunk)
                sent += len(chunk)
        answers = [receipts.get(timeout=30) for _ in range(3)]
    finally:
        link.close()
    wait_for(lambda: bool(d.aggregator.stats[1].anchor_tx), "round 1 to be anchored")
    return answers, sent


@pytest.mark.slow
def test_the_aggregator_counts_what_it_accepts_and_refuses_by_reason(
    deployment: Deployment,
) -> None:
    # Prepare: the metrics port as the service opens it
    d = deployment
    reader = TaskFigureReader(d.chain, Archive(d.archive), d.spec.task)
    with status_server(reader, MetricsSettings(port=0)) as server:
        before = scrape(server.port)
        # Execute
        answers, sent = a_round_with_a_forgery(d)
        after = scrape(server.port)
    # Assert: the counters moved by what happened, and by nothing else
    assert sorted((r.accepted, r.reason) for r in answers) == [
        (False, "bad-signature"),
        (True, ""),
        (True, ""),
    ]

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("truscl_updates_accepted_total") == 2
    assert moved("truscl_updates_rejected_total", reason="bad-signature") == 1
    assert moved("truscl_bytes_in_total") == sent
    assert moved("truscl_anchor_attempts_total", kind="round") == 1
    assert moved("truscl_anchor_failures_total", kind="round") == 0
    assert moved("truscl_round_close_seconds_count") == 1
    # the journal counted the refusal for the report and the status page too
    (first, *_) = reader.read().rounds
    assert (first.round, first.participants, first.rejections) == (1, 2, {"bad-signature": 1})


def _a_worker_counts(pipe: Connection) -> None:
    """A worker process's counting: three updates accepted, one refused for a reason of its
    own, 1,000 bytes in; reported once, on the way out."""
    metrics.UPDATES_ACCEPTED.inc(3)
    metrics.UPDATES_REJECTED.labels("held-full").inc()
    metrics.BYTES_IN.inc(1_000)
    stop = threading.Event()
    stop.set()
    metrics.report_counts(pipe, stop)


def test_metrics_served_for_worker_processes_count_theirs_with_the_services_own() -> None:
    # Prepare: this process has counted updates of its own
    counts = WorkerCounts()
    metrics.UPDATES_ACCEPTED.inc(2)
    own = parse(metrics.metrics_page()[0].decode())
    # Execute: a worker process counts and reports
    worker = multiprocessing.get_context("spawn").Process(
        target=_a_worker_counts, args=(counts.pipe(1),)
    )
    worker.start()
    worker.join(60)
    wait_for(lambda: parse(counts.page()[0].decode()) != own, "the worker's counts")
    served = parse(counts.page()[0].decode())
    # Assert: each counter the worker moved is the sum, a reason only the worker saw
    # included; nothing else moved, nothing went missing
    assert worker.exitcode == 0
    moved = {key: served[key] - own.get(key, 0.0) for key in served if served[key] != own.get(key)}
    assert moved == {
        ("truscl_updates_accepted_total", frozenset()): 3,
        ("truscl_updates_rejected_total", frozenset({("reason", "held-full")})): 1,
        ("truscl_bytes_in_total", frozenset()): 1_000,
    }
    assert set(own) <= set(served)


@pytest.mark.slow
def test_the_demo_services_export_their_figures(fleet_run: FleetRun) -> None:
    # Prepare: what the demo scraped from each service before stopping it
    folder = fleet_run.workdir / "metrics"
    aggregator = parse((folder / "aggregator.metrics.prom").read_text())
    owner = parse((folder / "owner.metrics.prom").read_text())
    devices = [parse(p.read_text()) for p in sorted(folder.glob("device-*.metrics.prom"))]
    rounds = fleet_run.summary["rounds"]
    # Assert
    assert value(aggregator, "truscl_updates_accepted_total") == sum(
        r["participants"] for r in rounds
    )
    assert value(aggregator, "truscl_anchor_attempts_total", kind="round") == len(rounds)
    assert value(aggregator, "truscl_round_close_seconds_count") == len(rounds)
    assert value(aggregator, "truscl_bytes_in_total") >= sum(r["bytes"] for r in rounds)
    assert value(owner, "truscl_anchor_attempts_total", kind="model") == len(rounds)
    assert value(owner, "truscl_rounds_refused_total") == 0
    assert len(devices) == 2
    for samples in devices:
        (epsilon,) = [v for (name, _), v in samples.items() if name == "truscl_epsilon_spent"]
        assert epsilon == pytest.approx(fleet_run.summary["epsilon"], abs=1e-3)
        health = [v for (name, _), v in samples.items() if name == "truscl_sensor_healthy"]
        assert health == [1.0] * 4


def secrets(workdir: Path) -> dict[str, list[str]]:
    """Every secret of the run, each as the strings it could leak as: keys are the files with
    mode 0600 (chain keys, HE key shares and seeds, broker keys and passwords, data salts)."""
    found = {}
    for path in workdir.rglob("*"):
        if not path.is_file() or path.stat().st_mode & 0o777 != 0o600:
            continue
        if path.name in ("privacy-ledger.json", "passwd", "mosquitto.db", "mosquitto.log"):
            continue  # counts, salted hashes, the broker's own files: no key of anyone's
        data = path.read_bytes()
        if data.startswith(b"-----BEGIN"):  # a PEM key: its base64 lines
            found[str(path)] = [line for line in data.decode().splitlines()[1:-1] if line]
        elif path.name == "password":
            found[str(path)] = [data.decode().strip()]
        else:  # raw bytes: windows at offsets 3k, hex and base64 (as a part of a longer blob)
            needles = []
            for start in range(0, max(1, len(data) - 23), max(3, (len(data) // 8) // 3 * 3)):
                window = data[start : start + 24]
                needles += [window.hex(), base64.b64encode(window).decode()]
                needles.append(base64.urlsafe_b64encode(window).decode())
            found[str(path)] = needles
    return found


@pytest.mark.slow
def test_a_json_demo_leaks_no_key_material_into_logs_or_metrics(fleet_run: FleetRun) -> None:
    # Prepare: everything the run wrote for its operator
    work = fleet_run.workdir
    logs = sorted((work / "logs").glob("*.log"))
    services = [p for p in logs if p.stem not in ("anvil", "guardian-init")]
    texts = {str(p): p.read_text(errors="replace") for p in logs}
    texts |= {str(p): p.read_text(errors="replace") for p in (work / "metrics").iterdir()}
    texts |= {"demo stdout": fleet_run.stdout, "demo stderr": fleet_run.stderr}
    keys = secrets(work)
    # Assert: the secrets are there to look for, and none is in what the operator sees
    assert any("device.key" in k for k in keys) and any("he-key-share" in k for k in keys)
    assert sum("he-key-share" in k for k in keys) == 2  # the owner's and the guardian's
    for where, text in texts.items():
        for secret, needles in keys.items():
            for needle in needles:
                assert needle.lower() not in text.lower(), f"{secret} appears in {where}"
    # and each service's log is one JSON object per line, with the fields collectors expect
    assert len(services) == 5  # owner, aggregator, guardian, two devices
    for path in services:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            assert {"time", "level", "logger", "message"} <= set(entry), line


def test_the_metrics_table_is_optional_local_by_default_and_checked(tmp_path: Path) -> None:
    # Prepare: the reference files, and the aggregator's without its [metrics] table
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    aggregator_text = (deploy / "aggregator.toml").read_text()
    bare = tmp_path / "bare.toml"
    bare.write_text(aggregator_text[: aggregator_text.index("[metrics]")])

    def aggregator_with(table: str) -> Path:
        path = tmp_path / "aggregator.toml"
        path.write_text(bare.read_text() + table)
        return path

    # Execute / Assert
    assert AggregatorConfig.load(bare).metrics is None
    assert AggregatorConfig.load(deploy / "aggregator.toml").metrics == MetricsSettings(9101)
    assert OwnerConfig.load(deploy / "owner.toml").metrics == MetricsSettings(9102)
    assert AgentConfig.load(deploy / "agent.toml").metrics == MetricsSettings(9103)
    explorer = AggregatorConfig.load(aggregator_with('[metrics]\nport = 1\nexplorer = "x/{tx}"'))
    assert explorer.metrics == MetricsSettings(1, "127.0.0.1", "x/{tx}")
    for table, complaint in (
        ("[metrics]\nbind = '0.0.0.0'", "metrics.port"),
        ("[metrics]\nport = 70000", "metrics.port"),
        ("[metrics]\nport = 1\nexplorer = 'https://x/'", "{tx}"),
        ("[metrics]\nport = 1\nhost = 'a'", "metrics.host"),
    ):
        with pytest.raises(ConfigError, match=re.escape(complaint)):
            AggregatorConfig.load(aggregator_with(table))


def test_json_logs_are_one_object_per_line_with_extras_and_tracebacks() -> None:
    # Prepare
    stream = io.StringIO()
    logs.configure("INFO", "json", stream)
    log = logging.getLogger("truscl.test")
    try:
        # Execute: a message with arguments and extras, a quote and a newline, a failure
        log.info('round %d closed\nwith "%s"', 3, "quotes", extra={"round": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        log.debug("not at INFO")
    finally:
        logs.configure("WARNING")
    # Assert
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == 'round 3 closed\nwith "quotes"' and first["round"] == 3
    assert (first["level"], first["logger"]) == ("INFO", "truscl.test")
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
