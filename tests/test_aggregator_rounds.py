"""The aggregator service across restarts and round boundaries, on a real broker, the in-process
EVM, a real task owner and real CKKS: the journal, the durable anchoring queue and late updates.

Deadlines run on a clock each test holds and advances only once the updates it waits for have
been decided (receipts are the evidence), so no test races the wall clock.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from conftest import task_owner
from eth_account import Account
from eth_account.signers.local import LocalAccount

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.errors import ConfigError
from truscl.mqtt import MqttLink
from truscl.privacy.ckks import OwnerKeys, decrypt, encrypt, load_context
from truscl.server.aggregator import Aggregator, Shard
from truscl.server.archive import Archive
from truscl.server.audit import audit_task
from truscl.server.journal import Journal, JournaledRound
from truscl.server.owner import TaskOwner
from truscl.server.rounds import PartialRound
from truscl.task import TaskSpec
from truscl.wire import Domain, TaskTopics, Update, envelope, split_update
from truscl.wire.receipt import Receipt

pytestmark = pytest.mark.slow
T = TypeVar("T")
WAIT_S = 60.0  # generous: a loaded 2-core machine


class Clock:
    """The aggregator's clock: it moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Task:
    tmp: Path
    chain: EmbeddedChain
    contract: ChainClient
    owner: TaskOwner
    spec: TaskSpec
    broker: Mosquitto
    aggregator_account: LocalAccount
    devices: list[LocalAccount]
    domain: Domain
    keys: OwnerKeys
    clock: Clock = field(default_factory=Clock)
    closed: queue.Queue[int] = field(default_factory=queue.Queue)
    models: queue.Queue[int] = field(default_factory=queue.Queue)

    def aggregator(
        self, account: LocalAccount | None = None, shard: Shard | None = None
    ) -> Aggregator:
        return Aggregator(
            spec=self.spec,
            public_context=self.owner.public_context,
            chain=self.chain.client(self.contract.address, account or self.aggregator_account),
            archive=Archive(self.tmp / "archive"),
            broker=self.broker.settings,
            expected=len(self.devices),
            clock=self.clock,
            on_closed=lambda stats: self.closed.put(stats.round),
            shard=shard,
        ).start()

    def update(self, device: LocalAccount, round_no: int, value: float = 1.0) -> Update:
        context = load_context(self.keys.public_context_bytes())
        return Update(
            task=self.spec.task_id,
            round=round_no,
            device=bytes.fromhex(device.address[2:]),
            ciphertext=encrypt(context, np.full(self.spec.n_params, value)),
            context=bytes.fromhex(self.spec.context_hash[2:]),
            samples=10,
            epsilon_micros=1,
            data_root=b"\x01" * 32,
        ).signed(device, self.domain)

    def audit(self) -> tuple[int, int, dict[str, object]]:
        report = audit_task(
            self.chain.client(self.contract.address), Archive(self.tmp / "archive"), self.spec.task
        )
        return report.verified, report.total, report.as_dict()


def in_journal(task: Task, read: Callable[[Journal], T]) -> T:
    """``read`` done on the aggregator's journal, opened as an operator would."""
    journal = Journal(task.tmp / "archive" / "journal" / f"{task.spec.task}.sqlite", task.spec.task)
    try:
        return read(journal)
    finally:
        journal.close()


def journaled(task: Task, round_no: int) -> JournaledRound:
    """What the aggregator's journal holds of ``round_no``."""
    entry = in_journal(task, lambda journal: journal.round(round_no))
    assert entry is not None
    return entry


class Devices:
    """The devices' side of the broker: publish updates, collect the signed receipts."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.topics = TaskTopics(task.spec.task)
        self.receipts: queue.Queue[Receipt] = queue.Queue()
        self.rounds: queue.Queue[int] = queue.Queue()
        self.link = MqttLink(
            "test-devices",
            task.broker.settings,
            on_message=self._on_message,
            subscriptions=[self.topics.base + "/receipts/+", self.topics.round],
            max_message=1 << 20,
        ).start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.round:
            self.rounds.put(envelope.decode(payload, "round", 1024)["round"])
        elif envelope.decode_any(payload, ("receipt", "inclusion"), 1 << 16)[0] == "receipt":
            self.receipts.put(Receipt.decode(payload))

    def send(self, device: LocalAccount, update: Update) -> Receipt:
        for chunk in split_update(update, self.task.spec.max_message):
            self.link.publish(self.topics.updates(device.address), chunk)
        while True:
            receipt = self.receipts.get(timeout=WAIT_S)
            if receipt.device_address == device.address:
                return receipt

    def send_to(self, shard: Aggregator, device: LocalAccount, update: Update) -> Receipt:
        """As the broker's shared subscription would: the whole update to this one shard."""
        for chunk in split_update(update, self.task.spec.max_message):
            shard.receive(self.topics.updates(device.address), chunk)
        while True:
            receipt = self.receipts.get(timeout=WAIT_S)
            if receipt.device_address == device.address:
                return receipt

    def wait_round(self, round_no: int) -> None:
        while self.rounds.get(timeout=WAIT_S) != round_no:
            pass

    def close(self) -> None:
        self.link.close()


@pytest.fixture()
def make_task(tmp_path: Path, owner_keys: OwnerKeys) -> Iterator[object]:
    started: list[tuple[Mosquitto, TaskOwner]] = []

    def make(late_updates: bool = True, devices: int = 2) -> Task:
        chain = EmbeddedChain()
        contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
        accounts = [Account.create() for _ in range(devices)]
        for device in accounts:
            contract.register_device(device.address)
        broker = Mosquitto(tmp_path / "broker", persistent=True).start()
        owner = task_owner(chain, contract.address, owner_keys, broker)
        started.append((broker, owner))
        spec = occupancy_spec(
            owner.context_hash, rounds=3, quorum=1, round_seconds=60, late_updates=late_updates
        )
        task = Task(
            tmp_path,
            chain,
            contract,
            owner,
            spec,
            broker,
            chain.new_account(),
            accounts,
            Domain(contract.chain_id, contract.address),
            owner_keys,
        )
        owner.create_task(spec, task.aggregator_account.address, np.zeros(spec.n_params))
        return task

    yield make
    for broker, owner in started:
        owner.stop()
        broker.stop()


def test_a_restarted_aggregator_resumes_its_round_and_counts_each_update_once(make_task) -> None:
    # Prepare: round 1 accepts device 0's update, then the aggregator goes away
    task: Task = make_task()
    first, second = task.devices
    aggregator = task.aggregator()
    devices = Devices(task)
    try:
        devices.wait_round(1)
        update = task.update(first, 1)
        assert devices.send(first, update).accepted
        deadline = journaled(task, 1).deadline
        aggregator.stop()
        task.clock.now += 30  # time passes while it is away
        # Execute: a new process on the same archive; device 0 resends, device 1 sends
        again = task.aggregator()
        resent = devices.send(first, update)
        counted = devices.send(second, task.update(second, 1, 2.0))
        assert task.closed.get(timeout=WAIT_S) == 1
    finally:
        devices.close()
        again.stop()
    # Assert: the round kept its deadline and counted each update once; the audit holds
    assert journaled(task, 1).deadline == deadline
    assert resent.accepted and resent.counted_in == 1
    assert counted.accepted and counted.counted_in == 1
    anchor = task.contract.round_anchor(task.spec.task_id, 1)
    assert anchor is not None and anchor.updates == 2
    assert task.audit()[:2] == (1, 1)


def test_a_round_that_could_not_be_anchored_is_anchored_after_a_restart(make_task) -> None:
    # Prepare: an aggregator whose key the task does not name, so anchoring is refused
    task: Task = make_task(devices=1)
    (device,) = task.devices
    impostor = task.aggregator(task.chain.new_account())
    devices = Devices(task)
    try:
        devices.wait_round(1)
        assert devices.send(device, task.update(device, 1)).accepted
        assert task.contract.round_anchor(task.spec.task_id, 1) is None
        impostor.stop()
        state = journaled(task, 1).state
        # Execute: the task's own aggregator starts on the same archive and journal
        aggregator = task.aggregator()
        assert task.closed.get(timeout=WAIT_S) == 1
        devices.wait_round(2)  # the owner released model 1: round 2 opened, not round 1 again
    finally:
        devices.close()
        aggregator.stop()
    # Assert: closed and queued before the restart, anchored once after it
    assert state == "closed"
    anchor = task.contract.round_anchor(task.spec.task_id, 1)
    assert anchor is not None and anchor.updates == 1
    assert task.audit()[:2] == (1, 1)


@pytest.mark.parametrize("late_updates", [True, False])
def test_an_update_that_misses_its_round(make_task, late_updates: bool) -> None:
    # Prepare: round 1 closes at its deadline with device 0 alone
    task: Task = make_task(late_updates=late_updates)
    punctual, late = task.devices
    aggregator = task.aggregator()
    devices = Devices(task)
    try:
        devices.wait_round(1)
        assert devices.send(punctual, task.update(punctual, 1)).accepted
        task.clock.now += task.spec.round_seconds + 1
        assert task.closed.get(timeout=WAIT_S) == 1
        devices.wait_round(2)
        # Execute: device 1's round-1 update arrives while round 2 is open
        receipt = devices.send(late, task.update(late, 1, 3.0))
        own = [devices.send(d, task.update(d, 2)) for d in (punctual, late)]
        assert task.closed.get(timeout=WAIT_S) == 2
    finally:
        devices.close()
        aggregator.stop()
    # Assert: counted once, in round 2, or refused as round-closed; the audit holds either way
    assert receipt.round == 1
    if late_updates:
        assert (receipt.accepted, receipt.counted_in) == (True, 2)
    else:
        assert (receipt.accepted, receipt.reason, receipt.counted_in) == (False, "round-closed", 0)
        assert aggregator.rejections["round-closed"] == 1
    assert all(r.accepted and r.counted_in == 2 for r in own)
    anchor = task.contract.round_anchor(task.spec.task_id, 2)
    assert anchor is not None and anchor.updates == (3 if late_updates else 2)
    verified, total, report = task.audit()
    assert (verified, total) == (2, 2), report
    if late_updates:  # an archive claiming round 1 counted the late update too is caught
        archive = Archive(task.tmp / "archive")
        first = archive.round(task.spec.task, 1)
        archive.put_round(replace(first, updates=(*first.updates, receipt.update.hex())))
        problems = task.audit()[2]["problems"]
        assert any("counted twice" in p for p in problems["2"]), problems  # type: ignore[index]


def test_results_published_while_the_broker_is_away_are_delivered_when_it_is_back(
    make_task,
) -> None:
    # Prepare: round 1 has device 0's update; then the broker goes away
    task: Task = make_task()
    punctual = task.devices[0]
    aggregator = task.aggregator()
    devices = Devices(task)
    try:
        devices.wait_round(1)
        assert devices.send(punctual, task.update(punctual, 1)).accepted
        task.broker.stop()
        # Execute: the deadline passes; the round closes and is anchored with nobody to tell
        task.clock.now += task.spec.round_seconds + 1
        wait_for(lambda: journaled(task, 1).state == "anchored", "round 1 anchored")
        task.broker.start()
        devices.wait_round(2)  # the owner got the aggregate and released model 1
        wait_for(lambda: journaled(task, 1).state == "delivered", "round 1 delivered")
    finally:
        devices.close()
        aggregator.stop()
    # Assert
    assert task.contract.model_hash(task.spec.task_id, 1) is not None
    assert task.audit()[:2] == (1, 1)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S}s"
        time.sleep(0.05)


def assert_round_one_summed(task: Task, updates: int, total: float) -> None:
    """Round 1 anchored with ``updates`` updates, whose aggregate decrypts to ``total`` in
    every value, and the audit re-sums it to the anchored hash."""
    anchor = task.contract.round_anchor(task.spec.task_id, 1)
    assert anchor is not None and anchor.updates == updates
    archive = Archive(task.tmp / "archive")
    aggregate = archive.get(archive.round(task.spec.task, 1).aggregate)
    assert np.allclose(decrypt(task.keys, aggregate, task.spec.n_params), total, atol=1e-3)
    assert task.audit()[:2] == (1, 1)


@contextmanager
def two_shards(task: Task) -> Iterator[tuple[Aggregator, Aggregator, Devices]]:
    """Shards 0 and 1 of the task's aggregator on one archive and journal, and the devices'
    side of the broker, once round 1 is open; all stopped at the end (a shard the test
    stopped already stops again harmlessly)."""
    leader = task.aggregator(shard=Shard(0, 2))
    devices = Devices(task)
    other = task.aggregator(shard=Shard(1, 2))
    try:
        devices.wait_round(1)
        yield leader, other, devices
    finally:
        devices.close()
        other.stop()
        leader.stop()


def test_two_shards_count_each_update_once_and_close_the_round_as_one_aggregator(
    make_task,
) -> None:
    # Prepare: a task of three devices, served by two shards on one archive and journal
    task: Task = make_task(devices=3)
    first, second, third = task.devices
    with two_shards(task) as (leader, other, devices):
        update = task.update(first, 1, 1.0)
        # Execute: the broker hands each update to one shard; a retry may reach the other
        counted = devices.send_to(other, first, update)
        retried = devices.send_to(leader, first, update)
        forked = devices.send_to(leader, first, task.update(first, 1, 5.0))
        at_leader = devices.send_to(leader, second, task.update(second, 1, 2.0))
        at_other = devices.send_to(other, third, task.update(third, 1, 4.0))
        assert task.closed.get(timeout=WAIT_S) == 1
    # Assert: the retry is acknowledged, the second update of one device refused; the round
    # holds each device once, in one sum, and the audit re-sums it to the anchored hash
    assert counted.accepted and counted.counted_in == 1
    assert retried.accepted and retried.update == counted.update
    assert not forked.accepted and forked.reason == "duplicate"
    assert at_leader.accepted and at_other.accepted
    assert_round_one_summed(task, updates=3, total=7.0)


def test_a_restarted_shard_takes_up_what_it_counted(make_task) -> None:
    # Prepare: the second shard counts device 0's update, then goes away mid-round
    task: Task = make_task(devices=3)
    first, second, third = task.devices
    leader = task.aggregator(shard=Shard(0, 2))
    devices = Devices(task)
    other = task.aggregator(shard=Shard(1, 2))
    try:
        devices.wait_round(1)
        assert devices.send_to(other, first, task.update(first, 1, 1.0)).accepted
        other.stop()
        # Execute: a new second shard on the same archive and journal; the round goes on
        other = task.aggregator(shard=Shard(1, 2))
        assert devices.send_to(leader, second, task.update(second, 1, 2.0)).accepted
        assert devices.send_to(other, third, task.update(third, 1, 4.0)).accepted
        assert task.closed.get(timeout=WAIT_S) == 1
    finally:
        devices.close()
        other.stop()
        leader.stop()
    # Assert: the round counted all three, the first from before the restart
    assert_round_one_summed(task, updates=3, total=7.0)


def round_one_closing_without_shard_one(
    task: Task, leader: Aggregator, other: Aggregator, devices: Devices
) -> None:
    """Shard 1 counts device 0's update and goes away; shard 0 counts the other two devices',
    marks round 1 closing and waits for shard 1's partial sum of it."""
    first, second, third = task.devices
    assert devices.send_to(other, first, task.update(first, 1, 1.0)).accepted
    other.stop()
    assert devices.send_to(leader, second, task.update(second, 1, 2.0)).accepted
    assert devices.send_to(leader, third, task.update(third, 1, 4.0)).accepted
    wait_for(lambda: in_journal(task, lambda journal: journal.is_closing(1)), "round 1 closing")


def test_a_partial_sum_that_misses_a_journaled_update_gives_way_to_the_journal(
    make_task, caplog: pytest.LogCaptureFixture
) -> None:
    task: Task = make_task(devices=3)
    with two_shards(task) as (leader, other, devices):
        round_one_closing_without_shard_one(task, leader, other, devices)
        # Execute: what stands as shard 1's partial sum holds nothing (a shard's bug, or a
        # journal edited by hand)
        empty = PartialRound(1, (), b"").encode()
        in_journal(task, lambda journal: journal.put_partial(1, 1, empty))
        assert task.closed.get(timeout=WAIT_S) == 1
    # Assert: the round counts what the journal counted (the devices hold receipts for all
    # three), and says why it did not take the partial sums
    assert_round_one_summed(task, updates=3, total=7.0)
    said = [r.getMessage() for r in caplog.records if "partial sums hold" in r.getMessage()]
    assert said == [
        "aggregator: round 1: the shards' partial sums hold 2 updates, the journal counted 3 "
        "(1 missing from the sums, 0 not journaled); closing it from the journal's updates as "
        "archived instead"
    ]


def test_a_round_closing_while_a_shard_is_away_closes_once_the_task_has_one_shard(
    make_task, caplog: pytest.LogCaptureFixture
) -> None:
    task: Task = make_task(devices=3)
    with two_shards(task) as (leader, other, devices):
        round_one_closing_without_shard_one(task, leader, other, devices)
        leader.stop()
        assert task.closed.empty()
        # Execute: the operator sets workers = 1; the one aggregator takes the round up
        single = task.aggregator(shard=Shard(0, 1))
        try:
            assert task.closed.get(timeout=WAIT_S) == 1
        finally:
            single.stop()
    # Assert: the round counts all three, shard 1's update rebuilt from the archive into the
    # one partial sum (not by falling back on the journal)
    assert_round_one_summed(task, updates=3, total=7.0)
    assert "partial sums hold" not in caplog.text


def test_an_aggregator_that_becomes_two_shards_takes_each_update_once(make_task) -> None:
    # Prepare: one aggregator opens round 1 and stops; its broker session outlives it
    task: Task = make_task(devices=4)
    single = task.aggregator()
    devices = Devices(task)
    try:
        devices.wait_round(1)
        single.stop()
        # Execute: the same task as two shards; the devices send through the broker
        leader = task.aggregator(shard=Shard(0, 2))
        other = task.aggregator(shard=Shard(1, 2))
        sent = 0
        for value, device in enumerate(task.devices, 1):
            update = task.update(device, 1, float(value))
            sent += sum(map(len, split_update(update, task.spec.max_message)))
            assert devices.send(device, update).accepted
        assert task.closed.get(timeout=WAIT_S) == 1
    finally:
        devices.close()
        other.stop()
        leader.stop()
    # Assert: the shards between them took each message once (shard 0 dropped the session's
    # own subscription of every update); the round holds all four
    assert leader.stats[1].bytes_in + other.stats[1].bytes_in == sent
    assert leader.stats[1].bytes_in and other.stats[1].bytes_in
    assert_round_one_summed(task, updates=4, total=10.0)


def test_a_task_whose_updates_travel_in_chunks_cannot_be_sharded(make_task) -> None:
    task: Task = make_task(devices=1)
    task.spec = replace(task.spec, max_message=16 * 1024)  # the owner's task had 128 KiB
    with pytest.raises(ConfigError, match="whole updates"):
        task.aggregator(shard=Shard(0, 2))
    task.aggregator(shard=Shard(0, 1)).stop()  # one aggregator reassembles chunks
