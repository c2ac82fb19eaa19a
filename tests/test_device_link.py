"""The agent's link to a deployment's broker, opened from the device's ``broker.toml`` (TLS, its
own certificate and login, the ACL) as the agent opens it.

scripts/arm64 runs this on the Pi's architecture against a broker on the host; the broker may be
shared there, so the test works in a task of its own.
"""

from __future__ import annotations

import queue
import secrets

import pytest
from conftest import BrokerLogins

from truscl.mqtt import MqttLink
from truscl.wire import chunking
from truscl.wire.topics import TaskTopics

pytestmark = pytest.mark.slow

WAIT = 60.0  # generous (emulated TLS is slow): every wait ends on a message, this bounds a failure


def test_an_update_goes_out_in_chunks_and_only_its_own_receipt_comes_back(
    provisioned_broker: BrokerLogins,
) -> None:
    # Prepare: the aggregator collecting updates, the device's link as the agent makes it
    task = TaskTopics("0x" + secrets.token_hex(32))
    device, other = provisioned_broker.devices[:2]
    updates: queue.Queue[tuple[str, bytes]] = queue.Queue()
    receipts: queue.Queue[tuple[str, bytes]] = queue.Queue()
    aggregator = MqttLink(
        "aggregator",
        provisioned_broker.settings("aggregator"),
        lambda t, p: updates.put((t, p)),
        [task.all_updates],
    ).start(WAIT)
    link = MqttLink(
        f"truscl-device-{device}",
        provisioned_broker.settings(device),
        lambda t, p: receipts.put((t, p)),
        [task.receipts(device), task.receipts(other)],  # the second is the ACL's to refuse
    )
    update = secrets.token_bytes(2 * chunking.DEFAULT_MAX_MESSAGE + 1000)
    try:
        link.start(WAIT)

        # Execute: a forged update as the other device, then the device's own; the aggregator
        # receipts the other device first, then this one
        link.publish_blob(task.updates(other), b"forged as the other device")
        sent = link.publish_blob(task.updates(device), update)
        acknowledged = link.flush(WAIT)
        reassembler = chunking.Reassembler()
        arrived: list[tuple[str, bytes]] = []
        whole = None
        while whole is None:
            topic, chunk = updates.get(timeout=WAIT)
            arrived.append((topic, chunk))
            whole = reassembler.add(topic, chunk)
        aggregator.publish(task.receipts(other), b"receipt of the other device")
        aggregator.publish(task.receipts(device), b"receipt of this device")
        first_receipt = receipts.get(timeout=WAIT)
    finally:
        link.close()
        aggregator.close()

    # Assert: the update arrived whole and alone, in its chunks; only its own receipt came back
    assert acknowledged
    assert whole == update
    assert {topic for topic, _ in arrived} == {task.updates(device)}
    assert len(arrived) == 3 and sent > len(update)
    assert first_receipt == (task.receipts(device), b"receipt of this device")


def test_the_aggregators_two_worker_processes_share_the_updates_under_the_acl(
    provisioned_broker: BrokerLogins,
) -> None:
    # Prepare: the aggregator's two processes, each with its own login (the broker makes the
    # login the client id), on the task's shared subscription
    task = TaskTopics("0x" + secrets.token_hex(32))
    device = provisioned_broker.devices[0]
    arrived: queue.Queue[tuple[int, bytes]] = queue.Queue()
    aggregator = provisioned_broker.settings("aggregator")
    links = [
        MqttLink(
            f"truscl-aggregator-{index}",
            aggregator.worker(index) if index else aggregator,
            lambda t, p, index=index: arrived.put((index, p)),
            [task.shared_updates],
        )
        for index in range(2)
    ]
    link = MqttLink(f"truscl-device-{device}", provisioned_broker.settings(device), print, [])
    received: dict[int, list[bytes]] = {0: [], 1: []}
    sent: list[bytes] = []
    try:
        for worker in links:
            worker.start(WAIT)
        link.start(WAIT)
        # Execute: the device publishes, one message at a time, until both have had one (a
        # link subscribes once connected: the first may come before the second's subscription)
        while not (received[0] and received[1]) and len(sent) < 50:
            sent.append(secrets.token_bytes(64))
            link.publish(task.updates(device), sent[-1])
            index, payload = arrived.get(timeout=WAIT)
            received[index].append(payload)
        assert link.flush(WAIT)
    finally:
        link.close()
        for worker in links:
            worker.close()

    # Assert: both stayed connected and had some; each message reached one of them, once
    assert received[0] and received[1], len(sent)
    assert arrived.empty() and sorted(received[0] + received[1]) == sorted(sent)
