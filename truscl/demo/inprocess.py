"""``truscl demo --in-process``: one whole task in this one process, every role talking through
MQTT and the chain.

A real mosquitto broker (child process), an in-process EVM with the truscl contract (or a node
given with ``--rpc``), the task owner, a key guardian (threshold mode, the default: the two run
the key generation over the broker, each in its own thread), one aggregator and N simulated
devices, each in its own threads. The harness plays the rooms (or each device's part of a
recorded trace, ``--data``): it advances each room's clock when the device reads its sensors,
and keeps a copy of every reading only to train the centralised, non-private baseline the
summary compares with.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from eth_account.signers.local import LocalAccount

from truscl.agent.device import DeviceAgent
from truscl.agent.sensors import Reading, SensorSuite
from truscl.broker import Mosquitto
from truscl.chain import ChainClient, DevChain, EmbeddedChain, NodeChain
from truscl.demo.common import (
    READING_INTERVAL_S,
    READINGS_PER_ROUND,
    DemoConfig,
    DemoFailed,
    RoundRow,
    accuracy,
    baseline_accuracy,
    demo_spec,
    evaluation_note,
    evaluation_rooms,
    summarise,
    test_set,
    write_demo_report,
)
from truscl.demo.data import RecordedTrace, recorded_trace
from truscl.errors import TrusclError
from truscl.keyfile import load_or_create_account
from truscl.mqtt import BrokerSettings
from truscl.privacy.ckks import PROFILES, OwnerKeys, context_hash
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.audit import audit_task
from truscl.server.config import OWNER_HOLDER
from truscl.server.guardian import Guardian, GuardianRecords
from truscl.server.keygen import (
    HolderState,
    KeygenBoard,
    KeygenRecord,
    KeygenTerms,
    await_session,
    publish_session,
    run_keygen_holder,
)
from truscl.server.owner import HeKeys, TaskOwner
from truscl.server.owner_service import UNBOUND_CONTEXT, initial_model
from truscl.sim.fleet import MONDAY_2024_01_08
from truscl.sim.hardware import FakeHardware, SimulatedDevice
from truscl.sim.rooms import Room, make_rooms
from truscl.wire.signing import Domain

log = logging.getLogger(__name__)


def sensor_source(
    advance: Callable[[], float], suite: SensorSuite, pooled: list[Reading], window: int
) -> Callable[[], list[Reading]]:
    """The valid readings a device made since its last round, in simulated time (a faulty one
    is never training data, as the service's sampler never queues one); ``advance`` puts the
    next moment on the device's wires and returns its time.

    The first call returns a full ``window``, as if the device had been sensing for days before
    the task began; each later call, the six hours of readings taken since.
    """

    def collect() -> list[Reading]:
        fresh = READINGS_PER_ROUND if pooled else window
        readings = [suite.read(advance()) for _ in range(fresh)]
        pooled.extend(readings)
        return [reading for reading in readings if reading.valid]

    return collect


def room_clock(device: SimulatedDevice) -> Callable[[], float]:
    """Advance ``device``'s room by one reading interval."""

    def advance() -> float:
        device.step(READING_INTERVAL_S)
        return device.now

    return advance


def run_in_process(
    config: DemoConfig,
    out: TextIO,
    *,
    clock: Callable[[], float] = time.time,
    on_accepted: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the task; ``clock`` is every role's (round deadlines) and ``on_accepted`` is
    told each accepted update's round and that round's count, so a test can drive deadlines.

    With ``drop_device_at``, the last device stops when the round before closes, on the
    aggregator's thread: the aggregator announces the next round only after, so the device
    cannot slip an update in, however the threads are scheduled.
    """
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's solver chatter
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="truscl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    hardware: list[tuple[str, FakeHardware, Callable[[], float]]] = []
    recorded: RecordedTrace | None = None
    evaluated: list[int] = []  # the rooms evaluated on (simulated rooms)
    if config.data is None:
        profiles = make_rooms(config.devices, config.seed)
        for i, p in enumerate(profiles):
            room = Room(p, seed=config.seed * 100 + i, start=MONDAY_2024_01_08)
            sim = SimulatedDevice(room, seed=i)
            hardware.append((sim.name, sim, room_clock(sim)))
        evaluated = evaluation_rooms(config.devices, config.seed)
        if note := evaluation_note(config.devices, config.seed):
            print(f"truscl demo: {note}", file=out)
        test = test_set(profiles, config.seed, evaluated)
    else:
        recorded = recorded_trace(config)
        print(f"truscl demo: {recorded.note}", file=out)
        config = replace(config, devices=recorded.devices)
        for i in range(recorded.devices):
            player = recorded.player(i)
            hardware.append((f"device-{i}", player.hardware, player.advance))
        test = recorded.test_set()
    pooled: list[list[Reading]] = [[] for _ in hardware]

    chain: DevChain = NodeChain(config.rpc) if config.rpc else EmbeddedChain()
    admin = chain.new_account()
    contract = ChainClient.deploy(chain.web3(), admin, chain.lock)

    owner_account, aggregator_account = chain.new_account(), chain.new_account()
    guardian_account = chain.new_account()
    (workdir / "owner").mkdir(exist_ok=True)
    task = "0x" + secrets.token_hex(32)
    domain = Domain(contract.chain_id, contract.address)

    models: queue.Queue[tuple[int, np.ndarray]] = queue.Queue()
    broker = Mosquitto(workdir / "broker").start()
    agents: list[DeviceAgent] = []
    suites: list[SensorSuite] = []
    owner: TaskOwner | None = None
    aggregator: Aggregator | None = None
    guardian: Guardian | None = None

    def drop(round_no: int) -> None:
        if config.drop_device_at == round_no:
            agents[-1].stop()

    try:
        most = None if recorded is None else recorded.most_readings
        draft = demo_spec(config, workdir / "owner", task, UNBOUND_CONTEXT, most)
        profile = PROFILES[draft.he_profile]
        terms: dict[str, Any] = {}
        if config.he_mode == "threshold":
            record = _keygen(
                workdir,
                task,
                domain,
                broker.settings,
                owner_account,
                guardian_account,
                profile.name,
            )
            owner_state = HolderState(workdir / "owner")
            keys = HeKeys(
                share=owner_state.share(OWNER_HOLDER, profile.name),
                public_context=owner_state.public_context(),
                guardians={GUARDIAN: guardian_account.address.lower()},
            )
            terms = {
                "key_holders": tuple((n, a.lower()) for n, a in record.terms.holders),
                "keygen_digest": "0x" + record.transcript.digest().hex(),
            }
        else:
            single = OwnerKeys.generate(profile)
            single.save(workdir / "owner" / "secret-context")
            keys = HeKeys.single_key(single)
        owner = TaskOwner(
            keys=keys,
            chain=chain.client(contract.address, owner_account),
            broker=broker.settings,
            on_model=lambda r, params: models.put((r, params)),
        )
        spec = replace(draft, context_hash="0x" + context_hash(keys.public_context).hex(), **terms)
        for index, (name, device, advance) in enumerate(hardware):
            account = load_or_create_account(workdir / "devices" / str(index) / "device.key")
            contract.register_device(account.address)
            suite = SensorSuite(device.pin_factory, device.i2c_bus)
            suites.append(suite)
            agents.append(
                DeviceAgent(
                    account=account,
                    task=spec.task,
                    chain=chain.client(contract.address),
                    broker=broker.settings,
                    workdir=workdir / "devices" / str(index),
                    collect=sensor_source(advance, suite, pooled[index], spec.window),
                    name=name,
                    clock=clock,  # the devices read the deadlines on the aggregator's clock
                ).start()
            )
        built = Aggregator(
            spec=spec,
            public_context=owner.public_context,
            chain=chain.client(contract.address, aggregator_account),
            archive=Archive(workdir / "archive"),
            broker=broker.settings,
            expected=config.devices,
            clock=clock,
            on_accepted=on_accepted,
            on_closed=lambda stats: drop(stats.round + 1),
        )
        drop(1)
        initial = initial_model(spec)
        owner.create_task(spec, aggregator_account.address, initial)
        if terms:
            guardian_state = HolderState(workdir / GUARDIAN)
            guardian = Guardian(
                task=task,
                owner=owner_account.address,
                name=GUARDIAN,
                share=guardian_state.share(GUARDIAN, profile.name),
                public_context=guardian_state.public_context(),
                keygen_digest=bytes.fromhex(terms["keygen_digest"][2:]),
                chain=chain.client(contract.address, guardian_account),
                account=guardian_account,
                broker=broker.settings,
                records=GuardianRecords(workdir / GUARDIAN),
            ).start()
        aggregator = built.start()  # from here on it has threads to stop
        rows: list[RoundRow] = []
        released_models = {}  # round: the model released after it
        print(
            f"truscl demo: {config.devices} devices, {config.rounds} rounds, in one process, "
            f"broker 127.0.0.1:{broker.port}, contract {contract.address}",
            file=out,
        )
        _, params = models.get(timeout=config.round_timeout)  # the initial model
        round_started = time.monotonic()
        for round_no in range(1, config.rounds + 1):
            if config.drop_device_at == round_no:
                print(f"  (device {agents[-1].name} stops before round {round_no})", file=out)
            try:
                released, params = models.get(timeout=config.round_timeout)
            except queue.Empty:
                raise DemoFailed(
                    f"round {round_no} did not complete within {config.round_timeout}s"
                ) from None
            released_models[released] = params
            stats = aggregator.stats[released]  # complete before the owner saw the aggregate
            seconds, round_started = time.monotonic() - round_started, time.monotonic()
            row = RoundRow(
                round=released,
                participants=stats.participants,
                accuracy=accuracy(spec, params, test),
                epsilon=stats.epsilon,
                bytes=stats.bytes_in,
                anchor_tx=stats.anchor_tx,
                seconds=seconds,
            )
            rows.append(row)
            print(row.line(config.devices), file=out)
        reader = chain.client(contract.address)
        report = audit_task(reader, Archive(workdir / "archive"), spec.task)
        refused = [r for r in range(1, config.rounds + 1) if reader.round_refusal(spec.task_id, r)]
        summary_md = write_demo_report(
            config,
            reader,
            Archive(workdir / "archive"),
            spec,
            released_models,
            test,
            workdir,
            evaluation_note(config.devices, config.seed) if recorded is None else recorded.note,
        )
    finally:
        for agent in agents:
            agent.stop()
        if aggregator is not None:
            aggregator.stop()
        if guardian is not None:
            guardian.stop()
        if owner is not None:
            owner.stop()
        for suite in suites:
            suite.close()
        broker.stop()

    # The baseline's data: what the evaluated rooms' devices read, or every device's part
    if recorded is None:
        everyone = [r for index in evaluated for r in pooled[index]]
    else:
        everyone = recorded.pooled(config.rounds, spec.window)
    baseline = baseline_accuracy(spec, everyone, test, initial)
    summary = summarise(
        config,
        rows,
        baseline,
        spec,
        report.as_dict(),
        time.monotonic() - started,
        {
            "refused_rounds": refused,
            "chain": config.rpc or "embedded",
            "contract": contract.address,
            "workdir": str(workdir),
            "report": str(summary_md),
        },
        out,
    )
    print(f"report: {summary_md}", file=out)
    if config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"keys, archive and broker log kept in {workdir}", file=out)
    return summary


GUARDIAN = "guardian-1"


def _keygen(
    workdir: Path,
    task: str,
    domain: Domain,
    broker: BrokerSettings,
    owner: LocalAccount,
    guardian: LocalAccount,
    profile: str,
) -> KeygenRecord:
    """The owner's and the guardian's sides of the key generation, each in its own thread,
    talking only through the broker, as their two processes would."""
    holders = sorted(((OWNER_HOLDER, owner.address), (GUARDIAN, guardian.address)))
    terms = KeygenTerms(profile, tuple(holders))
    records: dict[str, KeygenRecord] = {}
    failures: list[TrusclError] = []

    def holder(name: str, account: LocalAccount) -> None:
        try:
            with KeygenBoard(
                task=task, name=name, account=account, domain=domain, broker=broker
            ) as board:
                if name == OWNER_HOLDER:
                    publish_session(board, terms)
                    session = terms
                else:
                    session = await_session(board, OWNER_HOLDER, owner.address)
                _, records[name] = run_keygen_holder(board, session, HolderState(workdir / name))
        except TrusclError as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=holder, args=(name, account), name=f"keygen-{name}")
        for name, account in ((GUARDIAN, guardian), (OWNER_HOLDER, owner))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise DemoFailed(f"key generation failed: {failures[0]}")
    return records[OWNER_HOLDER]
