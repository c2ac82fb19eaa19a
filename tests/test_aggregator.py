"""The aggregator service under hostile input, on a real broker and the in-process EVM."""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from conftest import task_owner
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.mqtt import MqttLink
from truscl.privacy.ckks import OwnerKeys, encrypt, load_context
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.owner import TaskOwner
from truscl.task import TaskSpec
from truscl.wire import Domain, Reassembler, TaskTopics, Update, envelope, split, split_update
from truscl.wire.receipt import Receipt

pytestmark = pytest.mark.slow
MAX_MESSAGE = 16 * 1024


@dataclass
class Deployment:
    spec: TaskSpec
    chain: ChainClient
    aggregator: Aggregator
    broker: Mosquitto
    devices: list[LocalAccount]
    domain: Domain
    owner_keys: OwnerKeys
    archive: Path
    owner: TaskOwner


@pytest.fixture()
def deployment(tmp_path: Path, owner_keys: OwnerKeys) -> Iterator[Deployment]:
    chain = EmbeddedChain()
    admin = chain.new_account()
    contract = ChainClient.deploy(chain.web3(), admin, chain.lock)
    aggregator_account = chain.new_account()
    devices = [Account.create() for _ in range(3)]
    for device in devices[:2]:  # the third is never registered
        contract.register_device(device.address)
    with Mosquitto(tmp_path / "broker") as broker:
        owner = task_owner(chain, contract.address, owner_keys, broker)
        spec = occupancy_spec(
            owner.context_hash,
            rounds=2,
            quorum=1,
            round_seconds=60,
            max_message=MAX_MESSAGE,
        )
        aggregator = Aggregator(
            spec=spec,
            public_context=owner.public_context,
            chain=chain.client(contract.address, aggregator_account),
            archive=Archive(tmp_path / "archive"),
            broker=broker.settings,
            expected=2,
        )
        owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
        aggregator.start()
        try:
            yield Deployment(
                spec,
                contract,
                aggregator,
                broker,
                devices,
                Domain(contract.chain_id, contract.address),
                owner_keys,
                tmp_path / "archive",
                owner,
            )
        finally:
            aggregator.stop()
            owner.stop()


def signed_update(d: Deployment, device: LocalAccount, round_no: int = 1) -> Update:
    context = load_context(d.owner_keys.public_context_bytes())
    return Update(
        task=d.spec.task_id,
        round=round_no,
        device=bytes.fromhex(device.address[2:]),
        ciphertext=encrypt(context, np.full(d.spec.n_params, 0.5)),
        context=bytes.fromhex(d.spec.context_hash[2:]),
        samples=10,
        epsilon_micros=1,
        data_root=b"\x01" * 32,
    ).signed(device, d.domain)


def test_hostile_updates_are_rejected_with_reasons_and_the_service_goes_on(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a "device" connection that listens to every receipt
    d = deployment
    topics = TaskTopics(d.spec.task)
    receipts: queue.Queue[tuple[str, Receipt | None]] = queue.Queue()

    def on_message(topic: str, payload: bytes) -> None:
        if topic.startswith(topics.base + "/receipts/"):
            receipts.put((topic, Receipt.decode(payload)))
        elif topic == topics.round:
            receipts.put(("round", None))

    caplog.set_level(logging.WARNING, logger="truscl.server.aggregator")
    link = MqttLink(
        "test-device",
        d.broker.settings,
        on_message=on_message,
        subscriptions=[topics.base + "/receipts/+", topics.round],
        max_message=1 << 20,
    ).start()
    try:
        assert receipts.get(timeout=10)[0] == "round"  # round 1 is open
        honest, other, stranger = d.devices
        good = signed_update(d, honest)
        hostile = {
            "forged": replace(signed_update(d, other), signature=good.signature),
            "tampered": replace(good, samples=999),
            "unregistered": signed_update(d, stranger),
            "replayed-next-round": signed_update(d, other, round_no=2),
        }
        # Execute: garbage, an oversized chunk, the honest update under another id (its bytes'
        # keccak), the hostile updates, then the honest one twice
        link.publish(topics.updates(other.address), b"\x00not cbor")
        link.publish(topics.updates(other.address), os.urandom(MAX_MESSAGE + 1000))
        for chunk in split(good.encode(), MAX_MESSAGE, keccak(good.encode())):
            link.publish(topics.updates(other.address), chunk)
        for name, update in hostile.items():
            for chunk in split_update(update, MAX_MESSAGE):
                link.publish(topics.updates(name), chunk)
        for _ in range(2):
            for chunk in split_update(good, MAX_MESSAGE):
                link.publish(topics.updates(honest.address), chunk)
        got = [receipts.get(timeout=20) for _ in range(len(hostile) + 2)]
    finally:
        link.close()
    # Assert: each hostile update got its reason back, the honest one was accepted (twice:
    # the retry is acknowledged, not counted), and the aggregator is still at work. Every
    # receipt is signed by the task's aggregator, goes to the update's signer, and names the
    # round the update was made for.
    aggregator = d.chain.task(d.spec.task_id).aggregator
    for topic, receipt in got:
        assert receipt is not None
        receipt.verify(d.domain, aggregator)
        assert topic == topics.receipts(receipt.device_address)
    statuses = sorted((r.accepted, r.reason, r.round) for _, r in got if r is not None)
    assert statuses == [
        (False, "bad-signature", 1),
        (False, "bad-signature", 1),
        (False, "unknown-device", 1),
        (False, "wrong-round", 2),
        (True, "", 1),
        (True, "", 1),
    ]
    forged_to = {r.device_address for _, r in got if r is not None and not r.accepted}
    assert other.address in forged_to and stranger.address in forged_to
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in (
        "not a CBOR map",
        "exceeds",
        "does not match its id",
        "bad-signature",
        "unknown-device",
        "wrong-round",
    ):
        assert reason in logged
    assert d.aggregator.rejections["blob-mismatch"] == 1
    assert d.aggregator.stats[1].participants == 1
    assert d.aggregator.alive
    assert len(list((d.archive / "blobs").iterdir())) == 3  # spec, context, the honest update


def test_a_broker_that_lost_its_retained_messages_gets_the_round_announced_again(
    deployment: Deployment,
) -> None:
    # Prepare: round 1 is open; the broker keeps nothing across a restart (no persistence)
    d = deployment
    topics = TaskTopics(d.spec.task)
    announced: queue.Queue[dict] = queue.Queue()
    with MqttLink("first-look", d.broker.settings, lambda t, p: announced.put({}), [topics.round]):
        announced.get(timeout=10)

    # Execute: the broker restarts; a device that connects afterwards looks for the round
    d.broker.stop()
    d.broker.start()
    late_device = MqttLink(
        "late-device",
        d.broker.settings,
        lambda t, p: announced.put(envelope.decode(p, "round", 1024)),
        [topics.round],
    ).start()
    try:
        # Assert: the aggregator announced the open round again once it reconnected
        assert announced.get(timeout=60)["round"] == 1
    finally:
        late_device.close()


def test_an_update_the_archive_cannot_store_gets_no_receipt_and_counts_when_sent_again(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a device listening to receipts; round 1 open; the archive's blob folder replaced
    # by a file, so no blob can be written
    d = deployment
    topics = TaskTopics(d.spec.task)
    receipts: queue.Queue[Receipt | None] = queue.Queue()

    def on_message(topic: str, payload: bytes) -> None:
        receipts.put(None if topic == topics.round else Receipt.decode(payload))

    caplog.set_level(logging.WARNING, logger="truscl.server.aggregator")
    link = MqttLink(
        "test-device",
        d.broker.settings,
        on_message=on_message,
        subscriptions=[topics.base + "/receipts/+", topics.round],
        max_message=1 << 20,
    ).start()
    blobs = d.archive / "blobs"
    try:
        assert receipts.get(timeout=10) is None  # round 1 is open
        honest, _, stranger = d.devices
        good = signed_update(d, honest)
        blobs.rename(d.archive / "blobs.away")
        blobs.write_bytes(b"")

        # Execute: the honest update, which cannot be stored, then one the aggregator refuses
        for chunk in split_update(good, MAX_MESSAGE):
            link.publish(topics.updates(honest.address), chunk)
        wait_for_log(caplog, "could not be stored")
        for chunk in split_update(signed_update(d, stranger), MAX_MESSAGE):
            link.publish(topics.updates(stranger.address), chunk)
        refused = receipts.get(timeout=20)
        # the storage is back; the device, without a receipt, sends its update again
        blobs.unlink()
        (d.archive / "blobs.away").rename(blobs)
        for chunk in split_update(good, MAX_MESSAGE):
            link.publish(topics.updates(honest.address), chunk)
        accepted = receipts.get(timeout=20)
    finally:
        link.close()
    # Assert: receipts go out in order on one connection, so the refusal coming first shows
    # that the unstored update got none; sent again, it was counted once and is archived
    assert refused is not None and (refused.accepted, refused.reason) == (False, "unknown-device")
    assert accepted is not None and accepted.accepted and accepted.device_address == honest.address
    assert d.aggregator.stats[1].participants == 1
    assert (blobs / accepted.update.hex()).read_bytes() == good.encode()
    assert d.aggregator.alive


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"{text!r} was not logged within {seconds}s"
        time.sleep(0.05)


def test_an_aggregate_whose_model_has_not_come_is_sent_again_for_a_late_key_holder(
    deployment: Deployment,
) -> None:
    # Prepare: the owner is away, so round 1's model will not come; both devices send, and
    # the round's inclusion proofs (which go out after its aggregate) arrive
    d = deployment
    topics = TaskTopics(d.spec.task)
    d.owner.stop()
    heard: queue.Queue[bytes] = queue.Queue()
    subscriptions = [topics.round, topics.base + "/receipts/+"]
    with MqttLink(
        "test-device", d.broker.settings, lambda _t, p: heard.put(p), subscriptions
    ) as link:
        heard.get(timeout=30)  # round 1 is open
        for device in d.devices[:2]:
            for chunk in split_update(signed_update(d, device), MAX_MESSAGE):
                link.publish(topics.updates(device.address), chunk)
        while envelope.decode_any(heard.get(timeout=60), KINDS, 1 << 16)[0] != "inclusion":
            pass
    # Execute: a key holder that connects only now, after the aggregate went out
    chunks: queue.Queue[bytes] = queue.Queue()
    with MqttLink(
        "late-holder", d.broker.settings, lambda _t, p: chunks.put(p), [topics.aggregate]
    ):
        reassembler = Reassembler(max_message=1 << 20)
        blob = None
        while blob is None:
            blob = reassembler.add("aggregator", chunks.get(timeout=60))
    # Assert: it gets round 1's anchored aggregate, the same bytes
    message = envelope.decode(blob, "aggregate", len(blob))
    anchor = d.chain.round_anchor(d.spec.task_id, 1)
    assert anchor is not None and message["round"] == 1
    assert keccak(message["ciphertext"]) == anchor.aggregate_hash


KINDS = ("round", "receipt", "inclusion")
