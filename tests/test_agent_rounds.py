"""The device's round state machine and its update, without a broker, a chain or a clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from eth_account import Account
from eth_utils import keccak
from harness import synthetic_readings

from truscl.agent.contribution import UpdateInputs, make_update
from truscl.agent.outbox import Outbox
from truscl.agent.rounds import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    Drop,
    Phase,
    Publish,
    RoundBook,
    Terms,
    Train,
    may_count,
)
from truscl.demo import occupancy_spec
from truscl.privacy.ckks import OwnerKeys, context_hash, decrypt
from truscl.privacy.dp import secure_generator
from truscl.task import DpTerms
from truscl.wire import Domain, Update, UpdateRecord

MODEL = keccak(b"model")
DEVICE = Account.create().address
TERMS = Terms(rounds=3, late_updates=False)


def _record(round_no: int) -> UpdateRecord:
    return UpdateRecord(
        task=b"\x01" * 32,
        round=round_no,
        device=DEVICE,
        ciphertext_hash=keccak(text=f"ct {round_no}"),
        context=b"\x02" * 32,
        samples=128,
        epsilon_micros=1,
        data_root=b"\x03" * 32,
    )


def _through_sent(book: RoundBook, round_no: int, now: float = 0.0) -> bytes:
    """Announce, charge, build and send ``round_no``; its update id."""
    book.announced(round_no, MODEL, deadline=now + 30)
    update_id = keccak(text=f"update {round_no}")
    book.charged(round_no, ledger_index=round_no - 1, readings=128)
    book.built(round_no, update_id, _record(round_no), now)
    book.sent(round_no)
    return update_id


def _phases(book: RoundBook) -> dict[int, Phase]:
    return {s.round: s.phase for s in book.states()}


def test_a_round_walks_from_announcement_to_inclusion() -> None:
    book = RoundBook()

    announced = book.announced(1, MODEL, deadline=30.0)
    first_tick = book.tick(10.0, TERMS)
    charged = book.charged(1, ledger_index=0, readings=128)
    built = book.built(1, b"\x0a" * 32, _record(1), 11.0)
    sent = book.sent(1)
    after = book.tick(12.0, TERMS)
    receipt = book.receipt(b"\x0a" * 32, accepted=True, reason="", counted_in=1)
    included = book.included(1, "0xanchor")

    assert [s.phase for s in announced.changed] == [Phase.ANNOUNCED]
    assert first_tick.decisions == [Train(1, MODEL, charge=True)]
    assert charged.changed[0].ledger_index == 0 and not charged.decisions
    assert built.changed[0].phase == Phase.BUILT
    assert built.decisions == [Publish(1, b"\x0a" * 32)]
    assert [s.phase for s in sent.changed] == [Phase.SENT]
    assert after.decisions == []  # built: no second training, no early republish
    assert receipt.decisions == [Drop(b"\x0a" * 32)]
    assert receipt.changed[0].phase == Phase.ACCEPTED and receipt.changed[0].counted_in == 1
    assert included.changed[0].phase == Phase.INCLUDED
    assert included.changed[0].anchor_tx == "0xanchor"
    assert [s.record for s in book.candidates(1)] == [_record(1)]


def test_a_round_is_charged_once_and_trained_once() -> None:
    book = RoundBook()
    _through_sent(book, 1)

    again = book.announced(1, MODEL, deadline=30.0)  # the retained announcement, again
    tick = book.tick(1.0, TERMS)

    assert again.changed == [] and tick.decisions == []
    with pytest.raises(ValueError, match="cannot be charged"):
        book.charged(1, ledger_index=1, readings=128)


@pytest.mark.parametrize(
    ("late_updates", "round_no", "trains"),
    [(False, 1, False), (False, 3, False), (True, 1, True), (True, 3, False)],
)
def test_after_the_deadline_a_device_trains_only_for_an_update_that_can_still_count(
    late_updates: bool, round_no: int, trains: bool
) -> None:
    book = RoundBook()
    book.announced(round_no, MODEL, deadline=30.0)

    step = book.tick(30.0, Terms(rounds=3, late_updates=late_updates))

    assert may_count(round_no, 30.0, 29.9, Terms(3, late_updates))  # before it: always
    if trains:
        assert step.decisions == [Train(round_no, MODEL, charge=True)]
    else:
        assert step.decisions == []
        assert [(s.phase, s.reason) for s in step.changed] == [(Phase.SKIPPED, "deadline passed")]


def test_a_newer_round_skips_or_abandons_older_unfinished_ones() -> None:
    book = RoundBook()
    book.announced(1, MODEL, deadline=30.0)
    book.announced(2, MODEL, deadline=60.0)
    book.charged(2, ledger_index=0, readings=128)

    step = book.announced(3, MODEL, deadline=90.0)

    assert _phases(book) == {1: Phase.SKIPPED, 2: Phase.ABANDONED, 3: Phase.ANNOUNCED}
    assert {s.round for s in step.changed} == {2, 3}  # round 1 was skipped by round 2
    assert book.tick(61.0, TERMS).decisions == [Train(3, MODEL, charge=True)]


def test_a_restart_after_charging_rebuilds_without_charging_again() -> None:
    # Prepare: the agent died after the charge and before the update existed
    before = RoundBook()
    before.announced(2, MODEL, deadline=60.0)
    before.charged(2, ledger_index=1, readings=300)
    # Execute: a new agent from the same states, while the round may still count, then one
    # whose round has closed
    resumed = RoundBook(before.states())
    late = RoundBook(before.states())
    # Assert: rebuilt on the 300 readings (the sampling rate) it was charged for
    assert resumed.connected(10.0).decisions == []  # nothing was in the outbox
    assert resumed.tick(10.0, TERMS).decisions == [Train(2, MODEL, charge=False, readings=300)]
    step = late.tick(60.0, TERMS)
    assert step.decisions == []
    assert [(s.phase, s.ledger_index) for s in step.changed] == [(Phase.ABANDONED, 1)]


def test_a_restart_republishes_the_same_update_and_no_other() -> None:
    before = RoundBook()
    update_id = _through_sent(before, 1)

    resumed = RoundBook(before.states(), pending=[(update_id, 1)])
    connected = resumed.connected(100.0)
    tick = resumed.tick(100.0, TERMS)

    assert connected.decisions == [Publish(1, update_id)]
    assert tick.decisions == []  # no training for a round that has its update


def test_an_update_without_receipt_is_republished_with_bounded_backoff() -> None:
    book = RoundBook()
    update_id = _through_sent(book, 1, now=0.0)
    republished: list[float] = []

    for second in range(0, 1000):
        if book.tick(float(second), TERMS).decisions:
            republished.append(float(second))
    book.receipt(update_id, accepted=True, reason="", counted_in=1)
    after_receipt = [s for s in range(1000, 2000) if book.tick(float(s), TERMS).decisions]

    gaps = np.diff([0.0, *republished])
    assert republished[0] == RETRY_FIRST_S
    assert list(gaps[:5]) == [5.0, 10.0, 20.0, 40.0, 80.0]
    assert set(gaps[5:]) == {RETRY_MAX_S}
    assert after_receipt == []


def test_a_receipt_settles_the_outbox_and_a_later_rejection_does_not_undo_an_inclusion() -> None:
    book = RoundBook()
    update_id = _through_sent(book, 1)
    book.included(1, "0xanchor")  # the proof came, the receipt was lost

    still_pending = book.connected(50.0)
    rejection = book.receipt(update_id, accepted=False, reason="round-closed", counted_in=0)
    repeat = book.receipt(update_id, accepted=False, reason="round-closed", counted_in=0)
    stranger = book.receipt(b"\xff" * 32, accepted=True, reason="", counted_in=1)

    assert still_pending.decisions == [Publish(1, update_id)]  # only a receipt removes it
    assert rejection.decisions == [Drop(update_id)] and rejection.changed == []
    assert _phases(book) == {1: Phase.INCLUDED}
    assert repeat.decisions == [] and stranger.decisions == []


def test_a_rejected_update_is_recorded_with_its_reason() -> None:
    book = RoundBook()
    update_id = _through_sent(book, 1)

    step = book.receipt(update_id, accepted=False, reason="wrong-round", counted_in=0)

    assert [(s.phase, s.reason) for s in step.changed] == [(Phase.REJECTED, "wrong-round")]


def test_an_inclusion_proof_may_name_the_round_that_counted_a_late_update() -> None:
    book = RoundBook()
    update_id = _through_sent(book, 1)
    book.receipt(update_id, accepted=True, reason="", counted_in=2)

    assert [s.round for s in book.candidates(2)] == [1]
    assert [s.round for s in book.candidates(1)] == [1]
    assert book.candidates(3) == []


def test_round_states_survive_the_state_file(tmp_path: Path) -> None:
    # Prepare
    book = RoundBook()
    update_id = _through_sent(book, 1)
    book.announced(2, MODEL, deadline=60.0)
    book.charged(2, ledger_index=1, readings=128)
    states = book.states()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    # Execute
    with pytest.raises(ValueError, match="no update id"):
        outbox.build(states[1], "t/updates/a", b"an update of a round not built")
    outbox.save(states)
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.sqlite")
    # Assert
    assert reopened.rounds() == states
    assert reopened.rounds()[0].update_id == update_id
    assert len(reopened) == 0
    reopened.close()


def test_a_built_round_and_its_outbox_entry_are_written_together(tmp_path: Path) -> None:
    book = RoundBook()
    book.announced(1, MODEL, deadline=30.0)
    book.charged(1, ledger_index=0, readings=128)
    blob = b"signed update bytes"
    step = book.built(1, keccak(blob), _record(1), 0.0)
    outbox = Outbox(tmp_path / "outbox.sqlite")

    outbox.build(step.changed[0], "t/updates/a", blob)

    assert [(p.round, p.blob) for p in outbox.pending()] == [(1, blob)]
    assert [s.phase for s in outbox.rounds()] == [Phase.BUILT]
    outbox.close()


# -- make_update: DP-SGD, clipping, encryption and signing, no I/O ---------------------------


def test_make_update_signs_a_clipped_encrypted_delta(
    owner_keys: OwnerKeys, public_context: ts.Context
) -> None:
    # Prepare
    spec = occupancy_spec(
        "0x" + context_hash(owner_keys.public_context_bytes()).hex(),
        window=128,
        dp=DpTerms(batch_size=16),
    )
    account = Account.create()
    domain = Domain(31337, "0x" + "11" * 20)
    params = np.zeros(spec.n_params)
    inputs = UpdateInputs(
        round=2,
        params=params,
        window=synthetic_readings(128),
        epsilon_spent=1.25,
        data_root=b"\x07" * 32,
    )
    # Execute
    update = make_update(
        spec, inputs, context=public_context, account=account, domain=domain,
        rng=secure_generator(),
    )  # fmt: skip
    decoded = Update.decode(update.encode())
    # Assert: signed by the device for this task and round, and the owner decrypts a delta
    # within the task's bound
    decoded.verify(domain)
    assert decoded.device_address == account.address
    assert (decoded.task, decoded.round, decoded.samples) == (spec.task_id, 2, 128)
    assert decoded.epsilon_micros == 1_250_000 and decoded.data_root == b"\x07" * 32
    assert decoded.context == bytes.fromhex(spec.context_hash[2:])
    delta = decrypt(owner_keys, decoded.ciphertext, spec.n_params)
    assert 0 < np.linalg.norm(delta) <= spec.dp.update_clip + 1e-3
