"""A device that dies or is restarted between sending its update and the receipt, and forged
receipts on its topic: one charge and one update per round, the same bytes, an audited task.

Every role is its own ``truscl`` process (tests/harness.py). The aggregator is frozen (SIGSTOP)
while the device sends, so the device is certainly between send and receipt when it is killed:
the test waits on the device's state file, never on the clock. The aggregator is frozen rather
than restarted because a restarted aggregator loses its round's running sum (being fixed on
the aggregator's side).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import Fleet

from truscl.agent.rounds import Phase
from truscl.mqtt import MqttLink
from truscl.wire import Domain, TaskTopics, Update
from truscl.wire.receipt import Receipt

pytestmark = pytest.mark.slow
DEVICE = "device-0"


def _forge_accepted_receipt(fleet: Fleet, device: str, update_id: bytes) -> None:
    """An "accepted" receipt for the device's pending update, signed by a key that is not the
    task's aggregator, published on the device's receipt topic by another client."""
    forger = fleet.node.new_account()
    receipt = Receipt(
        task=fleet.task_id,
        round=1,
        device=bytes.fromhex(device[2:]),
        update=update_id,
        accepted=True,
        reason="",
        counted_in=1,
    ).signed(forger, Domain(fleet.contract.chain_id, fleet.contract.address))
    with MqttLink("forger", fleet.broker.settings, lambda t, p: None, []) as link:
        link.publish(TaskTopics(fleet.task).receipts(device), receipt.encode())


def _round_phase(fleet: Fleet, round_no: int) -> Phase | None:
    rounds, _ = fleet.device_state(DEVICE)
    return next((s.phase for s in rounds if s.round == round_no), None)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_device_stopped_between_send_and_receipt_sends_one_update_per_round(
    anvil: str, tmp_path: Path, how: signal.Signals
) -> None:
    # Prepare: round 1 has two of three updates; the aggregator freezes; the third device
    # starts, trains and sends
    fleet = Fleet(
        tmp_path, anvil, devices=3, terms={"rounds": 2, "quorum": 3, "round_seconds": 600.0}
    )
    try:
        fleet.start(hold=(DEVICE,))
        # the other two are in: the announcement is out and the aggregator waits for this one
        fleet.wait_for(lambda: "(2/3)" in fleet.log("aggregator"), "round 1 with two devices")
        fleet.pause("aggregator")
        fleet.run(DEVICE)
        fleet.wait_for(lambda: _round_phase(fleet, 1) == Phase.SENT, "round 1 sent")
        rounds, pending = fleet.device_state(DEVICE)
        (sent,) = pending
        address = Update.decode(sent.blob).device_address
        _forge_accepted_receipt(fleet, address, sent.blob_id)
        fleet.wait_for(
            lambda: "receipt is not signed by the task's aggregator" in fleet.log(DEVICE),
            "the forged receipt refused",
        )
        after_forgery = fleet.device_state(DEVICE)
        # Execute: the device dies (or is stopped) with no receipt; the aggregator comes back;
        # the device is started again
        if how == signal.SIGKILL:
            fleet.kill(DEVICE)
        else:
            assert fleet.stop(DEVICE) == 0, fleet.log(DEVICE)
        fleet.resume("aggregator")
        fleet.run(DEVICE)
        fleet.wait_for_model(2)
        for round_no in (1, 2):  # round 1's proof came while the device was down, or after
            fleet.wait_for(
                lambda r=round_no: _round_phase(fleet, r) == Phase.INCLUDED,
                f"round {round_no} included on the device",
            )
        fleet.wait_for(lambda: not fleet.device_state(DEVICE)[1], "the outbox emptied")
        report = fleet.audit()
        archive, task = fleet.archive, fleet.task
        manifests = [archive.round(task, r) for r in (1, 2)]
        signers = [
            [archive.update(ident)[1].device_address for ident in manifest.updates]
            for manifest in manifests
        ]
        final_rounds, _ = fleet.device_state(DEVICE)
        ledger = fleet.ledger(DEVICE)
    finally:
        fleet.close()

    # Assert: the forged receipt left the outbox and the round untouched, and was logged
    assert after_forgery == (rounds, pending)
    # one charge per round, recorded once in the state file
    assert len(ledger.rounds) == 2
    assert [(s.round, s.ledger_index) for s in final_rounds] == [(1, 0), (2, 1)]
    # the aggregator accepted exactly one update from the device per round; round 1's is the
    # very bytes it had sent before it was stopped
    assert [names.count(address) for names in signers] == [1, 1]
    round_one = [i for i in manifests[0].updates if archive.update(i)[0] == sent.blob]
    assert round_one == [sent.blob_id.hex()]
    assert final_rounds[0].update_id == sent.blob_id
    assert "duplicate" not in fleet.log("aggregator")
    assert (report.verified, report.total) == (2, 2), report.as_dict()
    device_log = fleet.log(DEVICE)
    assert "republished its round 1 update" in device_log
    assert device_log.count("round 1 update built") == 1
