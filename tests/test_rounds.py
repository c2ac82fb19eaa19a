"""The aggregator's pure round logic: every decision, and what a closed round holds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tenseal as ts
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from test_guardian import uncompressed_ciphertext

from truscl.errors import ChainError, HeError, ProtocolError
from truscl.privacy import ckks
from truscl.privacy.ckks import (
    CkksProfile,
    OwnerKeys,
    context_hash,
    decrypt,
    encrypt,
    pack_vector,
)
from truscl.server.rounds import (
    Accepted,
    OpenRound,
    Parsed,
    PartialRound,
    Rejected,
    RejectReason,
    RoundTerms,
    merge,
)
from truscl.wire import Domain, Update, verify_proof

DOMAIN = Domain(chain_id=31337, contract="0x" + "ab" * 20)
TASK = b"\x07" * 32
N_PARAMS = 5


@pytest.fixture()
def devices() -> list[LocalAccount]:
    return [Account.create() for _ in range(4)]


@pytest.fixture()
def terms(owner_keys: OwnerKeys) -> RoundTerms:
    return RoundTerms(
        task=TASK,
        round=2,
        context_hash=context_hash(owner_keys.public_context_bytes()),
        n_params=N_PARAMS,
        quorum=2,
        expected=3,
        deadline=100.0,
        max_update_bytes=1 << 22,
    )


def open_round(terms: RoundTerms, context: ts.Context, registered: list[LocalAccount]):
    addresses = {a.address for a in registered}
    return OpenRound(terms, DOMAIN, context, addresses.__contains__)


def update_blob(
    account: LocalAccount,
    terms: RoundTerms,
    he: ts.Context,
    values: np.ndarray,
    **overrides: object,
) -> bytes:
    fields: dict[str, object] = dict(
        task=terms.task,
        round=terms.round,
        device=bytes.fromhex(account.address[2:]),
        ciphertext=encrypt(he, values),
        context=terms.context_hash,
        samples=100,
        epsilon_micros=2_000_000,
        data_root=b"\x05" * 32,
    )
    fields.update(overrides)
    return Update(**fields).signed(account, DOMAIN).encode()  # type: ignore[arg-type]


def test_the_encrypted_sum_equals_the_plaintext_sum(
    terms, public_context, owner_keys, devices
) -> None:
    # Prepare
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 1, N_PARAMS) for _ in devices[:3]]
    round_ = open_round(terms, public_context, devices)
    # Execute
    decisions = [
        round_.offer(update_blob(d, terms, public_context, v))
        for d, v in zip(devices, deltas, strict=False)
    ]
    closed = round_.close()
    # Assert: CKKS at 2^40 scale keeps the sum within 1e-6 of the exact one
    assert all(isinstance(d, Accepted) for d in decisions)
    total = decrypt(owner_keys, closed.aggregate, N_PARAMS)
    np.testing.assert_allclose(total, np.sum(deltas, axis=0), atol=1e-6)
    assert closed.aggregate_hash == keccak(closed.aggregate)
    assert closed.samples == 300


def test_closed_round_proves_every_accepted_update(terms, public_context, devices) -> None:
    round_ = open_round(terms, public_context, devices)
    for d in devices[:3]:
        round_.offer(update_blob(d, terms, public_context, np.ones(N_PARAMS)))

    closed = round_.close()

    assert len(closed.leaves) == 3
    for accepted in closed.accepted:
        assert verify_proof(accepted.leaf, closed.proof(accepted.leaf), closed.root)


@pytest.mark.parametrize("workers", [2, 3, 6])
def test_workers_sharing_a_round_close_it_with_one_workers_root_and_aggregate(
    terms, public_context, owner_keys, workers
) -> None:
    # Prepare: six devices' updates; one worker takes them all in one order, the others share
    # them round-robin in another
    accounts = [Account.create() for _ in range(6)]
    rng = np.random.default_rng(workers)
    deltas = [rng.normal(0, 1, N_PARAMS) for _ in accounts]
    blobs = [
        update_blob(a, terms, public_context, v) for a, v in zip(accounts, deltas, strict=True)
    ]
    alone = open_round(terms, public_context, accounts)
    for blob in blobs:
        assert isinstance(alone.offer(blob), Accepted)
    shared = [open_round(terms, public_context, accounts) for _ in range(workers)]
    for index, blob in enumerate(reversed(blobs)):
        assert isinstance(shared[index % workers].offer(blob), Accepted)

    idle = open_round(terms, public_context, accounts)  # a shard the broker gave nothing

    # Execute: the partials as shards hand them over (encoded, through the journal)
    handed = [PartialRound.decode(w.partial().encode()) for w in [*shared, idle]]
    merged = merge(handed, public_context, N_PARAMS)
    closed = alone.close()

    # Assert: the same root, aggregate bytes and hash, leaves and proofs
    assert merged.root == closed.root and merged.leaves == closed.leaves
    assert merged.aggregate == closed.aggregate
    assert merged.aggregate_hash == closed.aggregate_hash == keccak(closed.aggregate)
    assert merged.samples == closed.samples == 600
    assert [a.blob_id for a in merged.accepted] == [a.blob_id for a in closed.accepted]
    total = decrypt(owner_keys, merged.aggregate, N_PARAMS)
    np.testing.assert_allclose(total, np.sum(deltas, axis=0), atol=1e-6)


def test_partials_that_count_an_update_twice_or_are_of_other_rounds_do_not_merge(
    terms, public_context, devices
) -> None:
    blob = update_blob(devices[0], terms, public_context, np.ones(N_PARAMS))
    first, second = (open_round(terms, public_context, devices) for _ in range(2))
    first.offer(blob)
    second.offer(blob)  # the same update, delivered to two workers
    later = open_round(replace(terms, round=terms.round + 1), public_context, devices)
    later.offer(
        update_blob(
            devices[1], replace(terms, round=terms.round + 1), public_context, np.ones(N_PARAMS)
        )
    )

    with pytest.raises(ProtocolError, match="counted in two partials"):
        merge([first.partial(), second.partial()], public_context, N_PARAMS)
    with pytest.raises(ProtocolError, match="rounds"):
        merge([first.partial(), later.partial()], public_context, N_PARAMS)


def test_a_partial_whose_leaf_is_not_its_records_or_that_is_not_one_is_refused(
    terms, public_context, devices
) -> None:
    round_ = open_round(terms, public_context, devices)
    round_.offer(update_blob(devices[0], terms, public_context, np.ones(N_PARAMS)))
    partial = round_.partial()
    (accepted,) = partial.accepted
    forged = replace(partial, accepted=(replace(accepted, leaf=b"\x00" * 32),))

    with pytest.raises(ProtocolError, match="a leaf is not its record's"):
        PartialRound.decode(forged.encode())
    with pytest.raises(ProtocolError, match="unreadable partial"):
        PartialRound.decode(b"\xa1\x01")
    assert PartialRound.decode(partial.encode()) == partial


def rejection(decision: object) -> RejectReason:
    assert isinstance(decision, Rejected), decision
    assert decision.detail
    return decision.reason


def test_rejections_name_their_reason(terms, public_context, devices) -> None:
    registered, stranger = devices[:3], devices[3]
    round_ = open_round(terms, public_context, registered)
    honest = update_blob(registered[0], terms, public_context, np.ones(N_PARAMS))
    ones = np.ones(N_PARAMS)

    def decoded(account: LocalAccount) -> Update:
        return Update.decode(update_blob(account, terms, public_context, ones), 1 << 22)

    # forged: device 2's update carrying device 1's signature
    forgery = replace(decoded(registered[2]), signature=decoded(registered[1]).signature)
    # tampered: a valid update whose ciphertext was swapped in transit
    tampered = replace(decoded(registered[1]), ciphertext=encrypt(public_context, ones * 9))

    assert rejection(round_.offer(b"\x00garbage")) == RejectReason.MALFORMED
    assert rejection(round_.offer(forgery.encode())) == RejectReason.BAD_SIGNATURE
    assert rejection(round_.offer(tampered.encode())) == RejectReason.BAD_SIGNATURE
    assert (
        rejection(round_.offer(update_blob(stranger, terms, public_context, ones)))
        == RejectReason.UNKNOWN_DEVICE
    )
    assert (
        rejection(round_.offer(update_blob(registered[1], terms, public_context, ones, round=3)))
        == RejectReason.WRONG_ROUND
    )
    assert (  # made for round 1, and this task does not count late updates
        rejection(round_.offer(update_blob(registered[1], terms, public_context, ones, round=1)))
        == RejectReason.CLOSED
    )
    assert (
        rejection(
            round_.offer(update_blob(registered[1], terms, public_context, ones, task=b"\x08" * 32))
        )
        == RejectReason.WRONG_TASK
    )
    assert (
        rejection(
            round_.offer(
                update_blob(registered[1], terms, public_context, ones, context=b"\x00" * 32)
            )
        )
        == RejectReason.WRONG_CONTEXT
    )
    assert (
        rejection(round_.offer(update_blob(registered[1], terms, public_context, np.ones(3))))
        == RejectReason.BAD_CIPHERTEXT
    )
    assert (
        rejection(
            round_.offer(update_blob(registered[1], terms, public_context, ones, ciphertext=b"xx"))
        )
        == RejectReason.BAD_CIPHERTEXT
    )
    # none of that changed the round
    assert isinstance(round_.offer(honest), Accepted)
    assert round_.participants == 1


def test_a_replay_is_acknowledged_once_and_a_second_update_rejected(
    terms, public_context, owner_keys, devices
) -> None:
    round_ = open_round(terms, public_context, devices)
    blob = update_blob(devices[0], terms, public_context, np.ones(N_PARAMS))

    first, again = round_.offer(blob), round_.offer(blob)
    other = round_.offer(update_blob(devices[0], terms, public_context, np.ones(N_PARAMS) * 2))

    assert isinstance(first, Accepted) and not first.repeat
    assert isinstance(again, Accepted) and again.repeat
    assert rejection(other) == RejectReason.DUPLICATE
    closed = round_.close()
    np.testing.assert_allclose(decrypt(owner_keys, closed.aggregate, N_PARAMS), 1.0, atol=1e-6)


def test_a_ciphertext_under_other_parameters_is_rejected(terms, public_context, devices) -> None:
    foreign = OwnerKeys.generate(CkksProfile("other", 8192, (60, 40, 60), 40))
    round_ = open_round(terms, public_context, devices)

    decision = round_.offer(update_blob(devices[0], terms, foreign.context, np.ones(N_PARAMS)))

    assert rejection(decision) == RejectReason.BAD_CIPHERTEXT


def test_a_parse_made_beforehand_decides_and_sums_as_the_round_would(
    terms, public_context, owner_keys, devices
) -> None:
    """The aggregator parses on other threads (``Parsed.of`` with the task's format), the round
    decides on that parse; a parse against another format is not trusted but redone."""
    # Prepare
    blobs = [
        update_blob(devices[0], terms, public_context, np.full(N_PARAMS, 1.0)),
        update_blob(devices[1], terms, public_context, np.ones(3)),  # wrong size
        update_blob(devices[1], terms, public_context, np.ones(N_PARAMS), ciphertext=b"xx"),
        update_blob(devices[2], terms, public_context, np.full(N_PARAMS, 2.0)),
    ]
    inline, parsed_first = (
        open_round(terms, public_context, devices),
        open_round(terms, public_context, devices),
    )
    other_format = ckks.VectorFormat.of(public_context, N_PARAMS + 1)

    # Execute
    expected = [inline.offer(blob) for blob in blobs]
    decided = [
        parsed_first.offer(blob, parsed=Parsed.of(blob, DOMAIN, 1 << 22, format_))
        for blob, format_ in zip(
            blobs, [parsed_first.vectors, parsed_first.vectors, None, other_format], strict=True
        )
    ]

    # Assert
    assert [type(d) for d in decided] == [Accepted, Rejected, Rejected, Accepted]
    assert decided == expected
    closed = parsed_first.close()
    assert closed.aggregate == inline.close().aggregate
    np.testing.assert_allclose(decrypt(owner_keys, closed.aggregate, N_PARAMS), 3.0, atol=1e-6)


def test_round_closes_when_all_are_in_or_at_the_deadline_with_quorum(
    terms, public_context, devices
) -> None:
    round_ = open_round(terms, public_context, devices)
    assert not round_.ready(now=0.0)
    round_.offer(update_blob(devices[0], terms, public_context, np.ones(N_PARAMS)))
    assert not round_.ready(now=terms.deadline + 1)  # below quorum even after the deadline
    round_.offer(update_blob(devices[1], terms, public_context, np.ones(N_PARAMS)))
    assert not round_.ready(now=terms.deadline - 1)  # quorum, but others may still come
    assert round_.ready(now=terms.deadline)  # a device dropped out: close at quorum
    round_.offer(update_blob(devices[2], terms, public_context, np.ones(N_PARAMS)))
    assert round_.ready(now=0.0)  # everyone is in


def test_a_closed_round_accepts_nothing(terms, public_context, devices) -> None:
    round_ = open_round(terms, public_context, devices)
    round_.offer(update_blob(devices[0], terms, public_context, np.ones(N_PARAMS)))
    round_.close()

    late = round_.offer(update_blob(devices[1], terms, public_context, np.ones(N_PARAMS)))

    assert rejection(late) == RejectReason.CLOSED


def test_the_aggregator_refuses_a_secret_key(terms, owner_keys, devices) -> None:
    with pytest.raises(HeError):
        open_round(terms, owner_keys.context, devices)


def non_ntt_ciphertext(context: ts.Context) -> bytes:
    """A real encryption whose SEAL header claims it is not in NTT form. Rebuilt by hand:
    SEAL's ciphertext, uncompressed, in truscl's vector."""
    raw = uncompressed_ciphertext(context, np.ones(N_PARAMS))
    raw[16 + 32] = 0  # after SEAL's header and the 32-byte parms_id: the NTT flag
    return pack_vector(N_PARAMS, [bytes(raw)])


def test_a_ciphertext_that_cannot_be_added_does_not_stall_the_round(
    terms, public_context, owner_keys, devices
) -> None:
    # Prepare: a registered device sends a crafted ciphertext first
    round_ = open_round(terms, public_context, devices)
    evil = non_ntt_ciphertext(public_context)
    # Execute
    first = round_.offer(
        update_blob(devices[0], terms, public_context, np.ones(N_PARAMS), ciphertext=evil)
    )
    honest = [
        round_.offer(update_blob(d, terms, public_context, np.ones(N_PARAMS))) for d in devices[1:3]
    ]
    # Assert: rejected, and the honest updates still add up
    assert rejection(first) == RejectReason.BAD_CIPHERTEXT
    assert all(isinstance(d, Accepted) for d in honest)
    total = decrypt(owner_keys, round_.close().aggregate, N_PARAMS)
    np.testing.assert_allclose(total, 2.0, atol=1e-6)


def test_a_late_update_counts_once_in_the_next_round(
    terms, public_context, owner_keys, devices
) -> None:
    # Prepare: round 2 under late_updates; round 1 counted device 0's round-1 update
    late_terms = replace(terms, late_updates=True)
    made_for_1 = replace(terms, round=1)
    counted_in_1 = update_blob(devices[0], made_for_1, public_context, np.ones(N_PARAMS))
    previous = {devices[0].address: Update.decode(counted_in_1).ident}
    round_ = OpenRound(
        late_terms, DOMAIN, public_context, {d.address for d in devices}.__contains__, previous
    )
    late = update_blob(devices[1], made_for_1, public_context, np.ones(N_PARAMS) * 2)
    own = update_blob(devices[1], late_terms, public_context, np.ones(N_PARAMS) * 3)
    # Execute
    decisions = {
        "late": round_.offer(late),
        "late again": round_.offer(late),
        "own": round_.offer(own),  # the same device's update made for round 2 counts too
        "retry of round 1's": round_.offer(counted_in_1),
        "other for round 1": round_.offer(
            update_blob(devices[0], made_for_1, public_context, np.ones(N_PARAMS) * 7)
        ),
        "too late": round_.offer(
            update_blob(devices[2], replace(terms, round=0), public_context, np.ones(N_PARAMS))
        ),
    }
    # Assert: the late update is counted in round 2 once, signed for round 1
    first, again = decisions["late"], decisions["late again"]
    assert isinstance(first, Accepted) and not first.repeat
    assert (first.update.round, first.counted_in) == (1, 2)
    assert isinstance(again, Accepted) and again.repeat and again.counted_in == 2
    assert isinstance(decisions["own"], Accepted) and decisions["own"].counted_in == 2
    retry = decisions["retry of round 1's"]
    assert isinstance(retry, Accepted) and retry.repeat and retry.counted_in == 1
    assert rejection(decisions["other for round 1"]) == RejectReason.DUPLICATE
    assert rejection(decisions["too late"]) == RejectReason.CLOSED
    assert round_.participants == 2 and round_.devices_in == {devices[1].address}
    closed = round_.close()
    assert {a.update.round for a in closed.accepted} == {1, 2}
    np.testing.assert_allclose(decrypt(owner_keys, closed.aggregate, N_PARAMS), 5.0, atol=1e-6)


def test_without_expected_devices_a_round_closes_when_last_rounds_devices_are_in(
    terms, public_context, devices
) -> None:
    active = frozenset(d.address for d in devices[:2])
    round_ = open_round(
        replace(terms, expected=0, quorum=1, active=active), public_context, devices
    )
    round_.offer(update_blob(devices[0], terms, public_context, np.ones(N_PARAMS)))
    round_.offer(update_blob(devices[3], terms, public_context, np.ones(N_PARAMS)))
    assert not round_.ready(now=0.0)  # device 1 contributed last round and is not in yet
    round_.offer(update_blob(devices[1], terms, public_context, np.ones(N_PARAMS)))
    assert round_.ready(now=0.0)


def test_a_late_update_does_not_make_its_device_in(terms, public_context, devices) -> None:
    late_terms = replace(terms, late_updates=True, expected=1, quorum=5)
    round_ = open_round(late_terms, public_context, devices)
    late = update_blob(devices[0], replace(terms, round=1), public_context, np.ones(N_PARAMS))
    assert isinstance(round_.offer(late), Accepted)
    assert not round_.ready(now=0.0)  # it counts, but device 0 has not sent round 2's update


def test_an_unreadable_registry_leaves_the_round_as_it_was(
    terms, public_context, owner_keys, devices
) -> None:
    answers: list[bool | None] = [None, True]

    def registry(device: str) -> bool:
        answer = answers.pop(0)
        if answer is None:
            raise ChainError("cannot reach a JSON-RPC node at http://127.0.0.1:1")
        return answer

    round_ = OpenRound(terms, DOMAIN, public_context, registry)
    blob = update_blob(devices[0], terms, public_context, np.ones(N_PARAMS))
    with pytest.raises(ChainError):
        round_.offer(blob)
    assert round_.participants == 0
    assert isinstance(round_.offer(blob), Accepted)  # decided once the node answers
    assert round_.participants == 1


def test_journaled_updates_are_not_asked_of_the_registry_again(
    terms, public_context, devices
) -> None:
    round_ = open_round(terms, public_context, [])  # the registry would refuse everyone
    blob = update_blob(devices[0], terms, public_context, np.ones(N_PARAMS))
    assert rejection(round_.offer(blob)) == RejectReason.UNKNOWN_DEVICE
    assert isinstance(round_.offer(blob, journaled=True), Accepted)
