"""Faults around the aggregator, with every role a real ``truscl`` process on a real broker and
anvil: a crash (``kill -9``), a stop while devices publish, a broker restart, and a node the
aggregator cannot reach while it validates and while it anchors.

Every round needs all three devices (quorum 3, a deadline far away), so an update lost or
counted twice would stall a round or fail the count; after each fault every round must complete,
count each device once, and verify in the audit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import task_owner
from eth_account import Account
from harness import Fleet, TcpGate

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, NodeChain
from truscl.demo import occupancy_spec
from truscl.mqtt import MqttLink
from truscl.privacy.ckks import OwnerKeys, encrypt, load_context
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.registry import RegistryCache
from truscl.wire import Domain, TaskTopics, Update, split_update
from truscl.wire.receipt import Receipt

pytestmark = pytest.mark.slow
ROUNDS = 3
DEVICES = 3


def fleet_of(tmp_path: Path, rpc: str) -> Fleet:
    terms = {"rounds": ROUNDS, "quorum": DEVICES, "round_seconds": 3600.0}
    return Fleet(tmp_path, rpc, devices=DEVICES, terms=terms)


def count(fleet: Fleet, name: str, text: str) -> int:
    return fleet.log(name).count(text)


def assert_complete(fleet: Fleet) -> None:
    """Every round anchored with each device once, and the audit verifies it."""
    for round_no in range(1, ROUNDS + 1):
        anchor = fleet.contract.round_anchor(fleet.task_id, round_no)
        assert anchor is not None and anchor.updates == DEVICES, (round_no, fleet.logs())
    report = fleet.audit()
    assert (report.verified, report.total) == (ROUNDS, ROUNDS), report.as_dict()
    log = fleet.log("aggregator")
    assert "unexpected failure" not in log and "Traceback" not in log, log[-3000:]


def test_an_aggregator_killed_mid_round_resumes_it(anvil: str, tmp_path: Path) -> None:
    # Prepare: device 2 sits out at first, so round 1 is open with two updates in
    fleet = fleet_of(tmp_path, anvil)
    try:
        fleet.start()
        fleet.stop("device-2")
        fleet.wait_for(lambda: count(fleet, "aggregator", "round 1 accepted") == 2, "2 updates")
        # Execute: no goodbye, whatever is not on disk is gone; then device 2 comes
        fleet.kill("aggregator")
        fleet.run("aggregator")
        fleet.run("device-2")
        fleet.wait_for_model(ROUNDS, seconds=240)
        # Assert
        assert_complete(fleet)
        assert "round 1 resumed with 2 updates" in fleet.log("aggregator")
    finally:
        fleet.close()


def test_updates_sent_while_the_aggregator_is_down_are_counted(anvil: str, tmp_path: Path) -> None:
    fleet = fleet_of(tmp_path, anvil)
    try:
        fleet.start()
        fleet.wait_for(lambda: "round 2 open" in fleet.log("aggregator"), "round 2")
        assert fleet.stop("aggregator") == 0
        for index in range(DEVICES):  # they publish to the broker, which keeps them (QoS 1)
            name = f"device-{index}"
            fleet.wait_for(lambda n=name: "round 2 update sent" in fleet.log(n), f"{name} sends")
        fleet.run("aggregator")
        fleet.wait_for_model(ROUNDS, seconds=240)
        assert_complete(fleet)
    finally:
        fleet.close()


def test_a_broker_restart_mid_round(anvil: str, tmp_path: Path) -> None:
    fleet = fleet_of(tmp_path, anvil)
    try:
        fleet.start()
        fleet.wait_for(lambda: "round 2 accepted" in fleet.log("aggregator"), "a round-2 update")
        fleet.broker.stop()
        fleet.broker.start()  # persistent: sessions, queued QoS 1 messages and retained ones
        fleet.wait_for_model(ROUNDS, seconds=240)
        assert_complete(fleet)
    finally:
        fleet.close()


def test_a_node_unreachable_while_a_round_closes_is_anchored_once_it_is_back(
    anvil: str, tmp_path: Path
) -> None:
    # Prepare: the aggregator reaches the node through a gate; device 2 sits out at first, so
    # round 1 cannot close before the gate shuts
    fleet = fleet_of(tmp_path, anvil)
    gate = TcpGate(int(anvil.rsplit(":", 1)[1])).up()
    try:
        fleet.start()
        fleet.stop("device-2")
        fleet.stop("aggregator")
        config = fleet.config("aggregator")
        config.write_text(config.read_text().replace(anvil, gate.url))
        fleet.run("aggregator")
        fleet.wait_for(lambda: count(fleet, "aggregator", "round 1 accepted") == 2, "2 updates")
        # Execute: the node goes away; device 2 comes back and sends; the round closes
        gate.down()
        fleet.run("device-2")
        fleet.wait_for(
            lambda: "round 1 not finished yet" in fleet.log("aggregator"), "an anchoring failure"
        )
        assert not fleet.model_released(1)
        gate.up()
        fleet.wait_for_model(ROUNDS, seconds=240)
        # Assert: anchored once, complete, audited; no failure was "unexpected"
        assert_complete(fleet)
    finally:
        gate.down()
        fleet.close()


def test_an_update_waits_while_the_registry_cannot_be_read(
    anvil: str, tmp_path: Path, owner_keys: OwnerKeys
) -> None:
    # Prepare: a task on anvil; the aggregator reads the registry through a gate, with a cache
    # that refreshes on every miss; device B is registered after the cache's first scan
    chain = NodeChain(anvil)
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    device_a, device_b = Account.create(), Account.create()
    contract.register_device(device_a.address)
    gate = TcpGate(int(anvil.rsplit(":", 1)[1])).up()
    aggregator_account = chain.new_account()
    registry = RegistryCache(
        ChainClient.at(NodeChain(gate.url, timeout=5).web3(), contract.address), refresh_s=0.0
    )
    with Mosquitto(tmp_path / "broker") as broker:
        owner = task_owner(chain, contract.address, owner_keys, broker)
        spec = occupancy_spec(owner.context_hash, rounds=1, quorum=2, round_seconds=3600)
        aggregator = Aggregator(
            spec=spec,
            public_context=owner.public_context,
            chain=chain.client(contract.address, aggregator_account),
            archive=Archive(tmp_path / "archive"),
            broker=broker.settings,
            expected=2,
            registry=registry,
        )
        owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
        aggregator.start()
        topics = TaskTopics(spec.task)
        receipts: list[Receipt] = []
        link = MqttLink(
            "test-devices",
            broker.settings,
            on_message=lambda t, p: receipts.append(Receipt.decode(p)),
            subscriptions=[topics.receipts(device_b.address)],
        ).start()
        domain = Domain(contract.chain_id, contract.address)
        context = load_context(owner_keys.public_context_bytes())

        def send(device: Account) -> None:
            update = Update(
                task=spec.task_id,
                round=1,
                device=bytes.fromhex(device.address[2:]),
                ciphertext=encrypt(context, np.ones(spec.n_params)),
                context=bytes.fromhex(spec.context_hash[2:]),
                samples=10,
                epsilon_micros=1,
                data_root=b"\x01" * 32,
            ).signed(device, domain)
            for chunk in split_update(update, spec.max_message):
                link.publish(topics.updates(device.address), chunk)

        try:
            wait(lambda: 1 in aggregator.stats, "round 1 open")
            send(device_a)
            wait(lambda: aggregator.stats[1].participants == 1, "device A counted")
            contract.register_device(device_b.address)
            # Execute: the node is unreachable when device B's update needs the registry
            gate.down()
            send(device_b)
            wait(lambda: aggregator._held, "device B's update held")
            gate.up()
            wait(lambda: receipts, "device B's receipt")
        finally:
            link.close()
            aggregator.stop()
            owner.stop()
            gate.down()
    # Assert: decided once the node answered, and accepted; nothing refused as unknown-device
    assert [(r.accepted, r.counted_in) for r in receipts] == [(True, 1)]
    assert aggregator.rejections["unknown-device"] == 0
    assert contract.round_anchor(spec.task_id, 1) is not None


def wait(condition: object, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds}s"
        time.sleep(0.05)
