"""The aggregator's hot path (issue 9): validated, summed and durably archived updates per
second for the largest updates a task allows, and its memory from 10 to 1,000 devices.

Everything is real: a mosquitto broker, an anvil node with the contract, every device
registered on it, the task created and its initial model anchored by an owner account, CKKS
ciphertexts of the model's size under the task's public key, each update signed by its own
device.

The issue asks for 10,000-parameter updates: the task here is the smallest MLP with one hidden
layer over the demo's four features that has that many, 10,003 parameters (three ciphertexts,
two chunks of the default 128 KiB messages).

Figures:

- ``floor_updates_per_s``: deserialise + add (parse and check the SEAL bytes, in-place modular
  add, as the aggregator does) of the same ciphertexts, back to back: the most any aggregator
  could do per core with this packing. ``stages_us`` also gives SEAL's own load (``seal_load``).
- ``stages_us``: what each step of one update costs (median), to see where the time goes.
- ``in_process``: one aggregator process, in process, through the real path
  (``Aggregator.receive``: reassembly, validation, signature, registry, sum, group-committed
  archive and journal, signed receipts on the broker); timed from the first chunk to the last
  update made durable. The registry's first scan of the chain (once per process) is made
  before the clock starts. The median of ``IN_PROCESS_RUNS`` runs, each with a task and an
  aggregator of its own (all in ``runs_updates_per_s``): one run of a second or so swings by
  10 % here.
- ``aggregator_updates_per_s``: the task's aggregator as ``PROCESSES`` worker processes
  (``workers`` in its configuration: shards of one task, started together), each handed every
  ``PROCESSES``-th update in process, as the broker's shared subscription hands them out, and
  timed the same way to the last one made durable; the median of ``IN_PROCESS_RUNS`` runs (all
  in ``sharded``). Its task sends each update in one message (``SHARD_MESSAGE``), as shards
  need.
- ``in_processes``: ``PROCESSES`` independent aggregators at once, each in its own process with
  a task of its own: what the machine gives processes that share nothing (no journal), the
  ceiling of the sharded figure.
- ``service``: end to end, ``truscl aggregator run`` as its own process, the updates published
  on the broker by the devices' client and timed to the last receipt (its first scan of the
  registry included); its peak RSS (VmHWM) per device count is ``aggregator_rss_mb``.
- ``service_sharded``: the same at the largest device count with ``workers = PROCESSES``
  (a task of whole-update messages), its CPU that of all the service's processes.
- ``service_path_cpu_ms_per_update``: the CPU one more update costs through the broker (the
  aggregator, mosquitto, the devices' client), from the two largest runs so that what a run pays
  once cancels out; ``service_cores_allow_per_s`` is the rate this machine's cores would allow
  at that cost with nothing else to do, whatever the number of aggregator processes.

Encrypting thousands of values takes tens of milliseconds, so a few distinct ciphertexts are made
and each device signs its own update around one of them: every update is a distinct signed
blob (its own id, signer and leaf) that the aggregator hashes, verifies, loads and adds in full.
All of it is made before any timing starts.

    .venv/bin/python bench/aggregator.py [--quick] [--json FILE]

``measure(quick)`` returns the figures for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from eth_account import Account
from eth_account.signers.local import LocalAccount

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import AGGREGATOR, CHAIN, TRUSCL  # noqa: E402
from truscl.broker import Mosquitto  # noqa: E402
from truscl.chain import ChainClient, NodeChain  # noqa: E402
from truscl.chain.anvil import Anvil  # noqa: E402
from truscl.demo import occupancy_spec  # noqa: E402
from truscl.hashing import keccak  # noqa: E402
from truscl.keyfile import write_secret  # noqa: E402
from truscl.mqtt import BrokerSettings, MqttLink  # noqa: E402
from truscl.privacy.ckks import (  # noqa: E402
    OwnerKeys,
    VectorFormat,
    VectorSum,
    aggregator_context_bytes,
    encrypt,
    load_ciphertext,
    load_context,
)
from truscl.processes import children, stop_process  # noqa: E402
from truscl.server.aggregator import Aggregator, Shard  # noqa: E402
from truscl.server.archive import Archive  # noqa: E402
from truscl.server.registry import RegistryCache  # noqa: E402
from truscl.task import TaskSpec  # noqa: E402
from truscl.wire import Domain, TaskTopics, Update, envelope, split_update  # noqa: E402
from truscl.wire.model import model_bytes  # noqa: E402
from truscl.wire.receipt import Receipt  # noqa: E402

ISSUE_PARAMS = 10_000  # the issue's figure is for updates of this many parameters
HIDDEN = -(-(ISSUE_PARAMS - 1) // (4 + 2))  # (features + 2) * hidden + 1 parameters, at least
N_PARAMS = (4 + 2) * HIDDEN + 1
TARGET_UPDATES_PER_S = 1_000.0
RSS_TOLERANCE = 0.10  # aggregator RSS within +-10 % from 10 to 1,000 devices
PROCESSES = 2  # aggregators at once in ``in_processes``: one per core here
IN_PROCESS_RUNS = 3  # in-process runs; the median is the figure
SHARD_MESSAGE = 256 * 1024  # the sharded task's max_message: one 10,003-parameter update


@dataclass
class World:
    """Broker, node, contract, owner, aggregator account and registered devices."""

    root: Path
    rpc: str
    broker: Mosquitto
    node: NodeChain
    contract: ChainClient
    owner: ChainClient
    aggregator: LocalAccount
    devices: list[LocalAccount]
    keys: OwnerKeys

    @functools.cached_property
    def domain(self) -> Domain:
        return Domain(self.contract.chain_id, self.contract.address)  # chain_id asks the node

    def new_task(
        self, devices: int, aggregator: LocalAccount | None = None, **terms: Any
    ) -> TaskSpec:
        """A one-round task for ``devices`` devices, created on chain with its model 0, served
        by ``aggregator`` (by default the world's); ``terms`` override the spec's."""
        public = self.keys.public_context_bytes()
        spec = occupancy_spec(
            "0x" + keccak(public).hex(),
            rounds=1,
            quorum=devices,
            round_seconds=3600.0,
            model="mlp",
            hidden=(HIDDEN,),
            **terms,
        )
        assert spec.n_params == N_PARAMS, spec.n_params
        self.owner.create_task(
            spec.task_id,
            spec.hash(),
            keccak(public),
            (aggregator or self.aggregator).address,
            spec.rounds,
            epsilon_micros=1,
            budget_micros=10**6,
            min_cohort=2,
        )
        self.owner.publish_model(spec.task_id, 0, keccak(model_bytes(np.zeros(N_PARAMS))))
        return spec


def publish_model(broker: BrokerSettings, spec: TaskSpec) -> None:
    """Model 0 on the task's model topic (retained), as the owner releases it."""
    data = model_bytes(np.zeros(N_PARAMS))
    message = envelope.encode("model", round=0, params=data, model_hash=keccak(data))
    with MqttLink("bench-owner", broker, lambda t, p: None, []) as link:
        link.publish(TaskTopics(spec.task).model, message, retain=True).wait_for_publish(30)


@contextlib.contextmanager
def world(root: Path, devices: int) -> Iterator[World]:
    with Anvil() as anvil, Mosquitto(root / "broker") as broker:
        node = NodeChain(anvil.url)
        contract = ChainClient.deploy(node.web3(), node.new_account(), node.lock)
        accounts = [Account.create() for _ in range(devices)]
        for account in accounts:
            contract.register_device(account.address)
        yield World(
            root=root,
            rpc=anvil.url,
            broker=broker,
            node=node,
            contract=contract,
            owner=node.client(contract.address, node.new_account()),
            aggregator=node.new_account(),
            devices=accounts,
            keys=OwnerKeys.generate(),
        )


def ciphertexts(keys: OwnerKeys, distinct: int) -> list[bytes]:
    context = load_context(keys.public_context_bytes())
    rng = np.random.default_rng(9)
    return [encrypt(context, rng.uniform(-1, 1, N_PARAMS)) for _ in range(distinct)]


def signed_update(w: World, spec: TaskSpec, device: LocalAccount, ciphertext: bytes) -> Update:
    return Update(
        task=spec.task_id,
        round=1,
        device=bytes.fromhex(device.address[2:]),
        ciphertext=ciphertext,
        context=bytes.fromhex(spec.context_hash[2:]),
        samples=100,
        epsilon_micros=1,
        data_root=keccak(device.key),
    ).signed(device, w.domain)


def signed_updates(
    w: World, spec: TaskSpec, devices: list[LocalAccount], cts: list[bytes]
) -> list[tuple[str, list[bytes]]]:
    """Each device's update, signed by it, as (topic, chunks)."""
    topics = TaskTopics(spec.task)
    return [
        (
            topics.updates(device.address),
            split_update(signed_update(w, spec, device, cts[index % len(cts)]), spec.max_message),
        )
        for index, device in enumerate(devices)
    ]


def median_us(step: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def floor_and_stages(w: World, spec: TaskSpec, cts: list[bytes], repeat: int) -> dict[str, Any]:
    """Deserialise + add back to back (the floor), and the median cost of each step."""
    context = load_context(aggregator_context_bytes(w.keys.public_context_bytes()))
    vectors = VectorFormat.of(context, N_PARAMS)
    total = VectorSum(vectors)
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(repeat):
        total.add(vectors.residues(cts[index % len(cts)]))
    floor = repeat / (time.perf_counter() - start)
    floor_cpu_ms = (time.process_time() - cpu_start) / repeat * 1e3
    device = w.devices[0]
    update = signed_update(w, spec, device, cts[0])
    encoded = update.encode()
    residues = vectors.residues(cts[0])
    receipt = Receipt(spec.task_id, 1, bytes.fromhex(device.address[2:]), update.ident, True, "", 1)
    archive = Archive(w.root / "stages")
    counter = iter(range(10**9))

    def archive_one() -> None:
        archive.put(encoded + next(counter).to_bytes(4, "big"))

    stages = {
        "keccak_ciphertext": median_us(lambda: keccak(update.ciphertext), repeat),
        "decode": median_us(lambda: Update.decode(encoded), repeat),
        "verify_signature": median_us(lambda: Update.decode(encoded).verify(w.domain), repeat),
        "deserialise": median_us(lambda: vectors.residues(cts[0]), repeat),
        "add": median_us(lambda: total.add(residues), repeat),
        # what deserialising cost through SEAL (load from a file, then its checks)
        "seal_load": median_us(lambda: load_ciphertext(context, cts[0], N_PARAMS), repeat),
        "sign_receipt": median_us(lambda: receipt.signed(w.aggregator, w.domain), repeat),
        "archive_one_fsynced": median_us(archive_one, max(10, repeat // 4)),
    }
    # verify_signature decodes a fresh update: it includes the ciphertext's one keccak (an
    # update's id comes from the same digest)
    return {
        "floor_updates_per_s": round(floor, 1),
        "floor_cpu_ms_per_update": round(floor_cpu_ms, 3),
        "ciphertexts_per_update": vectors.ciphertexts,
        "update_bytes": len(encoded),
        "stages_us": {name: round(us, 1) for name, us in stages.items()},
    }


@dataclass(frozen=True)
class Feed:
    """One in-process run: a task of its own, its signed updates, and how to reach the world
    (plain data: it can be handed to another process)."""

    rpc: str
    contract: str
    aggregator_key: bytes
    broker: BrokerSettings
    spec: bytes
    public_context: bytes
    archive: Path
    updates: list[tuple[str, list[bytes]]]


def feed(w: World, devices: int, cts: list[bytes], **terms: Any) -> Feed:
    aggregator = w.node.new_account()  # its own nonces: aggregators at once anchor at once
    spec = w.new_task(devices, aggregator, **terms)
    return Feed(
        rpc=w.rpc,
        contract=w.contract.address,
        aggregator_key=bytes(aggregator.key),
        broker=w.broker.settings,
        spec=spec.encode(),
        public_context=w.keys.public_context_bytes(),
        archive=w.root / f"archive-{spec.task[2:10]}",
        updates=signed_updates(w, spec, w.devices[:devices], cts),
    )


def in_process(
    job: Feed, start: Callable[[], object] = lambda: None, shard: Shard | None = None
) -> dict[str, Any]:
    """Through ``Aggregator.receive``: the real path minus the MQTT receive. ``start`` is
    called once the round is open, before the clock starts (a barrier, for several at once).
    ``shard``: this process is that shard of the task's aggregator, handed every ``count``-th
    update (shard 0 opens the round; the others take it from the journal)."""
    shard = shard or Shard()
    spec = TaskSpec.decode(job.spec)
    mine = job.updates[shard.index :: shard.count]
    done = threading.Event()

    def on_accepted(round_no: int, count: int) -> None:
        if count == len(mine):
            done.set()

    chain = NodeChain(job.rpc).client(job.contract, Account.from_key(job.aggregator_key))
    registry = RegistryCache(chain)
    registry.refresh()  # once per process, not per update: before the clock starts
    aggregator = Aggregator(
        spec=spec,
        public_context=job.public_context,
        chain=chain,
        registry=registry,
        archive=Archive(job.archive),
        broker=job.broker,
        expected=len(job.updates),
        on_accepted=on_accepted,
        shard=shard,
    ).start()
    try:
        if shard.leads:
            publish_model(job.broker, spec)
        _wait(lambda: 1 in aggregator.stats, "round 1 open", 60)
        start()
        timed = _timed(mine, aggregator.receive, done, "all accepted", time.process_time)
    finally:
        aggregator.stop()
    return timed


def in_processes(w: World, devices: int, cts: list[bytes], processes: int) -> dict[str, Any]:
    """``processes`` aggregators at once, each in its own process with a task of its own and
    ``devices`` updates, started together: what this machine's cores give aggregators that
    each have their own interpreter (and GIL) and share nothing."""
    return _at_once([(feed(w, devices, cts), Shard()) for _ in range(processes)])


def in_shards(w: World, devices: int, cts: list[bytes], shards: int) -> dict[str, Any]:
    """One task's aggregator as ``shards`` worker processes, started together, sharing its
    ``devices`` updates (a task of whole-update messages, as shards need)."""
    job = feed(w, devices, cts, max_message=SHARD_MESSAGE)
    if any(len(chunks) != 1 for _, chunks in job.updates):
        raise RuntimeError(f"an update does not fit one message of {SHARD_MESSAGE} bytes")
    return _at_once([(job, Shard(index, shards)) for index in range(shards)])


def _at_once(jobs: list[tuple[Feed, Shard]]) -> dict[str, Any]:
    """Each job in a process of its own, timed from a common start."""
    processes = len(jobs)
    context = multiprocessing.get_context("spawn")  # this process has threads: no fork
    barrier = context.Barrier(processes)
    results: multiprocessing.Queue[tuple[str, Any]] = context.Queue()
    children = [
        context.Process(target=_in_process_child, args=(job, shard, barrier, results))
        for job, shard in jobs
    ]
    for child in children:
        child.start()
    try:
        runs = [results.get(timeout=900) for _ in children]
    finally:
        for child in children:
            child.join(60)
            if child.is_alive():
                child.terminate()
    failed = [detail for outcome, detail in runs if outcome != "ok"]
    if failed:
        raise RuntimeError(f"an aggregator process failed: {failed[0]}")
    timed = [detail for _, detail in runs]
    updates = sum(t["updates"] for t in timed)
    seconds = max(t["seconds"] for t in timed)  # they started together: the last one ends it
    return {
        "processes": processes,
        "updates": updates,
        "seconds": seconds,
        "updates_per_s": round(updates / seconds, 1),
        "each_updates_per_s": [t["updates_per_s"] for t in timed],
        "each_cpu_ms_per_update": [t["cpu_ms_per_update"] for t in timed],
    }


def _in_process_child(
    job: Feed, shard: Shard, barrier: Any, results: multiprocessing.Queue[tuple[str, Any]]
) -> None:
    try:
        results.put(("ok", in_process(job, start=lambda: barrier.wait(120), shard=shard)))
    except Exception as exc:  # told to the parent, which fails the figure with it
        barrier.abort()
        results.put(("failed", f"{type(exc).__name__}: {exc}"))


def service(w: World, devices: int, cts: list[bytes], workers: int = 1) -> dict[str, Any]:
    """``truscl aggregator run`` in its own process (and, with ``workers``, its shards in
    theirs, on a task of whole-update messages), fed through the broker."""
    terms = {"max_message": SHARD_MESSAGE} if workers > 1 else {}
    spec = w.new_task(devices, None, **terms)
    folder = w.root / f"service-{devices}-{workers}"
    folder.mkdir()
    Archive(folder / "archive").put_task(spec.task, spec.encode(), w.keys.public_context_bytes())
    write_secret(folder / "aggregator.key", w.aggregator.key)
    config = folder / "aggregator.toml"
    config.write_text(
        AGGREGATOR.format(task=spec.task, devices=devices, workers=workers)
        + CHAIN.format(port=w.broker.port, rpc=w.rpc, contract=w.contract.address)
    )
    updates = signed_updates(w, spec, w.devices[:devices], cts)
    topics = TaskTopics(spec.task)
    accepted: set[str] = set()
    opened, all_in = threading.Event(), threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == topics.round:
            opened.set()
            return
        with contextlib.suppress(Exception):  # inclusion proofs share the receipt topic
            receipt = Receipt.decode(payload)
            if receipt.accepted:
                accepted.add(receipt.device_address)
                if len(accepted) == devices:
                    all_in.set()

    log = (folder / "aggregator.log").open("ab")
    process = subprocess.Popen(
        [TRUSCL, "--log-level", "INFO", "aggregator", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    link = MqttLink(
        "bench-devices",
        w.broker.settings,
        on_message,
        [topics.round, topics.base + "/receipts/+"],
        max_message=1 << 20,
    ).start()
    try:
        publish_model(w.broker.settings, spec)
        if not opened.wait(120):
            raise RuntimeError(f"the service opened no round: see {folder / 'aggregator.log'}")
        broker, devices_cpu = w.broker.pid, time.process_time
        assert broker is not None
        broker_start, devices_start = _thread_cpu_seconds(broker), devices_cpu()
        logged = folder / "aggregator.log"  # the shards' too: they inherit the service's stderr
        _wait(lambda: logged.read_text().count("takes updates") == workers - 1, "shards", 120)
        shards = children(process.pid)
        timed = _timed(
            updates, link.publish, all_in, f"all receipts (see {folder})",
            lambda: sum(_cpu_seconds(pid) for pid in (process.pid, *shards)),
        )  # fmt: skip
        # what the rest of the path cost the same cores: the broker, and the devices' client
        # (this process: it publishes every chunk and reads every receipt)
        per_update = 1e3 / len(updates)
        timed["broker_cpu_ms_per_update"] = round(
            (_thread_cpu_seconds(broker) - broker_start) * per_update, 3
        )
        timed["devices_cpu_ms_per_update"] = round((devices_cpu() - devices_start) * per_update, 3)
        rss = _status_mb(process.pid)
    finally:
        link.close()
        stop_process(process, 30)
        log.close()
    return {**timed, **rss}


def _timed(
    updates: list[tuple[str, list[bytes]]],
    send: Callable[[str, bytes], object],
    done: threading.Event,
    what: str,
    cpu: Callable[[], float],
) -> dict[str, float]:
    """From the first chunk sent to ``done``: updates per second of wall clock, and CPU
    milliseconds per update of the process ``cpu`` reads (all its threads). On a machine
    others load too, the wall clock says what they left; the CPU time is what the path costs."""
    start, cpu_start = time.perf_counter(), cpu()
    for topic, chunks in updates:
        for chunk in chunks:
            send(topic, chunk)
    if not done.wait(600):
        raise RuntimeError(f"not within 600 s: {what}")
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    return {
        "updates": len(updates),
        "seconds": round(seconds, 3),
        "updates_per_s": round(len(updates) / seconds, 1),
        "cpu_ms_per_update": round(cpu_seconds / len(updates) * 1e3, 3),
    }


def _marginal_path_ms(smaller: dict[str, float], larger: dict[str, float]) -> dict[str, float]:
    """CPU ms one more update costs the aggregator, the broker and the devices' client, from
    two runs of different sizes: what each run pays once (the registry's first scan of the
    chain) cancels out."""

    def cpu_s(run: dict[str, float], part: str) -> float:
        return run[f"{part}cpu_ms_per_update"] * run["updates"] / 1e3

    more = larger["updates"] - smaller["updates"]
    parts = {
        name: round((cpu_s(larger, part) - cpu_s(smaller, part)) / more * 1e3, 3)
        for name, part in (("aggregator", ""), ("broker", "broker_"), ("devices", "devices_"))
    }
    return {**parts, "total": round(sum(parts.values()), 3)}


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds(pid: int) -> float:
    """CPU time of a single-threaded process (mosquitto) so far, to the nanosecond: the few
    milliseconds a small run costs the broker are below ``/proc/PID/stat``'s clock ticks."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _status_mb(pid: int) -> dict[str, float]:
    """Peak and current resident memory of a process, in MB (from /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_peak_mb": round(fields["VmHWM"], 1), "rss_mb": round(fields["VmRSS"], 1)}


def _wait(condition: Callable[[], bool], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {seconds}s")
        time.sleep(0.05)


def measure(quick: bool = False) -> dict[str, Any]:
    """The figures, with the issue's JSON keys ``aggregator_updates_per_s`` and
    ``aggregator_rss_mb`` (peak RSS of the service process, by device count)."""
    counts = (10, 100) if quick else (10, 100, 1000)
    in_process_updates = 100 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="truscl-bench-agg-") as folder:
        with world(Path(folder), max(*counts, in_process_updates)) as w:
            cts = ciphertexts(w.keys, 4 if quick else 16)
            figures = floor_and_stages(w, w.new_task(2), cts, 50 if quick else 200)
            runs = [in_process(feed(w, in_process_updates, cts)) for _ in range(IN_PROCESS_RUNS)]
            inside = _median(runs)
            sharded = _median(
                [in_shards(w, in_process_updates, cts, PROCESSES) for _ in range(IN_PROCESS_RUNS)]
            )
            parallel = in_processes(w, in_process_updates, cts, PROCESSES)
            services = {str(n): service(w, n, cts) for n in counts}
            sharded_service = service(w, counts[-1], cts, workers=PROCESSES)
    rss = {n: s["rss_peak_mb"] for n, s in services.items()}
    largest = services[str(counts[-1])]
    path_ms = _marginal_path_ms(services[str(counts[-2])], largest)
    return {
        "params": N_PARAMS,
        **figures,
        "aggregator_updates_per_s": round(sharded["updates_per_s"], 1),
        "sharded": sharded,
        "in_process": inside,
        "in_processes": parallel,
        "service": services,
        "service_updates_per_s": round(largest["updates_per_s"], 1),
        "service_sharded": {**sharded_service, "workers": PROCESSES},
        # CPU the whole path through the broker costs this machine per update (aggregator,
        # broker, devices' client), and the rate its cores would allow at that cost, busy
        # with nothing else: the ceiling of any number of aggregator processes here
        "service_path_cpu_ms_per_update": path_ms,
        "service_cores_allow_per_s": round((os.cpu_count() or 1) * 1e3 / path_ms["total"], 1),
        "aggregator_rss_mb": rss,
        "rss_spread": round(max(rss.values()) / min(rss.values()) - 1, 3),
        "targets": {"updates_per_s": TARGET_UPDATES_PER_S, "rss_spread": RSS_TOLERANCE},
        "cores": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 1),
        "quick": quick,
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate, with every run's rate."""
    return {
        **sorted(runs, key=lambda run: run["updates_per_s"])[len(runs) // 2],
        "runs_updates_per_s": [run["updates_per_s"] for run in runs],
    }


def report(figures: dict[str, Any]) -> str:
    floor, floor_cpu = figures["floor_updates_per_s"], figures["floor_cpu_ms_per_update"]
    inside, service = figures["in_process"], figures["service"][max(figures["service"], key=int)]
    path, parallel = figures["service_path_cpu_ms_per_update"], figures["in_processes"]
    sharded = figures["sharded"]

    def row(name: str, per_s: float, cpu_ms: float) -> str:
        return f"  {name:32s} {per_s:8.0f} /s wall  {cpu_ms:6.2f} ms CPU/update"

    lines = [
        f"{figures['params']:,}-parameter updates: {figures['ciphertexts_per_update']} "
        f"ciphertexts, {figures['update_bytes']:,} bytes each; {figures['cores']} cores, "
        f"load average {figures['load_average']:.1f}",
        row("floor (deserialise + add)", floor, floor_cpu),
        row("aggregator, in process", inside["updates_per_s"], inside["cpu_ms_per_update"])
        + f"  (median of {', '.join(f'{r:.0f}' for r in inside['runs_updates_per_s'])})",
        f"  one task's aggregator as {sharded['processes']} worker processes (shards), in process:"
        f" {sharded['updates_per_s']:.0f} /s (median of"
        f" {', '.join(f'{r:.0f}' for r in sharded['runs_updates_per_s'])}; CPU ms/update by"
        f" shard {', '.join(f'{c:.2f}' for c in sharded['each_cpu_ms_per_update'])})",
        f"  {parallel['processes']} independent aggregators at once, each in its own process:"
        f" {parallel['updates_per_s']:.0f} /s together"
        f" ({', '.join(f'{r:.0f}' for r in parallel['each_updates_per_s'])}): the shards'"
        " ceiling",
        row(
            f"service, {service['updates']} via mosquitto",
            service["updates_per_s"],
            service["cpu_ms_per_update"],
        ),
        row(
            f"  the same, workers = {figures['service_sharded']['workers']}",
            figures["service_sharded"]["updates_per_s"],
            figures["service_sharded"]["cpu_ms_per_update"],
        ),
        f"  through the broker, CPU ms one more update costs: aggregator {path['aggregator']:.2f},"
        f" broker {path['broker']:.2f}, devices' client {path['devices']:.2f}: the"
        f" {figures['cores']} cores allow at most {figures['service_cores_allow_per_s']:.0f} /s",
        f"  target {TARGET_UPDATES_PER_S:,.0f} /s: one process"
        f" {inside['updates_per_s'] / floor:.0%} of the floor's rate; one idle core would do"
        f" {1e3 / inside['cpu_ms_per_update']:.0f} /s at this CPU cost",
        "  per update (median us): "
        + ", ".join(f"{k} {v:.0f}" for k, v in figures["stages_us"].items()),
        "  service peak RSS (MB) by devices: "
        + ", ".join(f"{n}: {mb:.0f}" for n, mb in figures["aggregator_rss_mb"].items())
        + f"   spread {figures['rss_spread']:+.0%}, target within +-{RSS_TOLERANCE:.0%}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer devices and repeats")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = measure(args.quick)
    print(report(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
