"""Wire protocol: envelope, chunking, EIP-712 update signatures, Merkle proofs."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from eth_account import Account
from eth_utils import keccak

from truscl.errors import ProtocolError, SignatureError
from truscl.wire import Domain, Reassembler, Update, envelope, split, split_update
from truscl.wire.chunking import ChunkRejected
from truscl.wire.merkle import EMPTY_ROOT, merkle_proof, merkle_proofs, merkle_root, verify_proof
from truscl.wire.receipt import Receipt
from truscl.wire.signing import SECP256K1_N
from truscl.wire.update import LEAF_ABI, UPDATE_FIELDS, UPDATE_TYPES, UpdateRecord

DOMAIN = Domain(chain_id=31337, contract="0x" + "ab" * 20)


def make_update(account, **overrides) -> Update:
    fields = dict(
        task=b"\x01" * 32,
        round=3,
        device=bytes.fromhex(account.address[2:]),
        ciphertext=os.urandom(300),
        context=b"\x02" * 32,
        samples=864,
        epsilon_micros=1_234_567,
        data_root=b"\x03" * 32,
    )
    fields.update(overrides)
    return Update(**fields)


# -- envelope ------------------------------------------------------------------------------


def test_envelope_round_trip() -> None:
    payload = envelope.encode("model", round=2, params=b"id", model_hash=b"h")

    fields = envelope.decode(payload, "model", 1024)

    assert fields == {"round": 2, "params": b"id", "model_hash": b"h"}


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xff\xff\x00garbage", "undecodable"),
        (cbor2.dumps([1, 2, 3]), "not a CBOR map"),
        (cbor2.dumps({"v": envelope.VERSION + 1, "type": "model"}), "version"),
        (cbor2.dumps({"v": envelope.VERSION - 1, "type": "model"}), "version"),
        (cbor2.dumps({"v": envelope.VERSION, "type": "round"}), "expected a model"),
        (cbor2.dumps({"v": envelope.VERSION, "type": "model", "round": 1}), "missing"),
        (
            cbor2.dumps(
                {
                    "v": envelope.VERSION,
                    "type": "model",
                    "round": "1",
                    "params": b"",
                    "model_hash": b"",
                }
            ),
            "must be int",
        ),
        (
            cbor2.dumps(
                {
                    "v": envelope.VERSION,
                    "type": "model",
                    "round": -1,
                    "params": b"",
                    "model_hash": b"",
                }
            ),
            "negative",
        ),
        (
            cbor2.dumps(
                {
                    "v": envelope.VERSION,
                    "type": "model",
                    "round": True,
                    "params": b"",
                    "model_hash": b"",
                }
            ),
            "must be int",
        ),
    ],
)
def test_envelope_rejects_malformed_messages(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        envelope.decode(payload, "model", 1024)


def test_envelope_rejects_oversized_before_parsing() -> None:
    payload = envelope.encode("model", round=1, params=b"x" * 2000, model_hash=b"")

    with pytest.raises(ProtocolError, match="exceeds"):
        envelope.decode(payload, "model", 1024)


# -- chunking ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1871, 1872, 1873, 20_000])
def test_chunks_respect_the_limit_and_reassemble_in_any_order(size: int) -> None:
    blob = os.urandom(size)
    chunks = split(blob, max_message=2000)
    reassembler = Reassembler(max_message=2000)

    results = [reassembler.add("dev", c) for c in reversed(chunks)]

    assert all(len(c) <= 2000 for c in chunks)
    assert results[-1] == blob
    assert all(r is None for r in results[:-1])
    assert reassembler.pending == 0


def test_duplicate_chunks_are_harmless() -> None:
    blob = os.urandom(9000)
    chunks = split(blob, max_message=2000)
    reassembler = Reassembler(max_message=2000)

    results = [reassembler.add("dev", c) for c in [chunks[0], *chunks]]

    assert results[-1] == blob


def test_a_tampered_chunk_is_detected() -> None:
    chunks = split(os.urandom(6000), max_message=2000)
    fields = envelope.decode(chunks[1], "chunk", 2000)
    fields["data"] = bytes(b ^ 1 for b in fields["data"])
    reassembler = Reassembler(max_message=2000)
    reassembler.add("dev", chunks[0])
    reassembler.add("dev", envelope.encode("chunk", **fields))

    with pytest.raises(ProtocolError, match="does not match its id"):
        for chunk in chunks[2:]:
            reassembler.add("dev", chunk)


def test_a_receiver_takes_chunks_smaller_than_its_own_limit() -> None:
    blob = os.urandom(50_000)
    reassembler = Reassembler(max_message=128 * 1024)

    results = [reassembler.add("dev", c) for c in split(blob, max_message=1024)]

    assert results[-1] == blob


def test_chunks_below_the_minimum_message_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1024"):
        split(b"x" * 100, max_message=1000)


def test_reassembler_bounds_what_a_sender_can_make_it_hold() -> None:
    reassembler = Reassembler(max_message=2000, max_blob=4000, max_partial_per_sender=2)
    too_big = split(os.urandom(20_000), max_message=2000)

    with pytest.raises(ProtocolError, match="exceeds"):
        reassembler.add("dev", too_big[0])
    for _ in range(2):
        reassembler.add("dev", split(os.urandom(3000), max_message=2000)[0])
    with pytest.raises(ProtocolError, match="in flight"):
        reassembler.add("dev", split(os.urandom(3000), max_message=2000)[0])
    reassembler.add("other", split(os.urandom(3000), max_message=2000)[0])  # others unaffected


def test_partial_blobs_expire() -> None:
    now = [0.0]
    reassembler = Reassembler(max_message=2000, ttl=10, clock=lambda: now[0])
    reassembler.add("dev", split(os.urandom(3000), max_message=2000)[0])

    now[0] = 11.0

    assert reassembler.expire() == 1
    assert reassembler.pending == 0


def test_only_stale_partial_blobs_expire_oldest_first() -> None:
    now = [0.0]
    reassembler = Reassembler(max_message=2000, ttl=10, clock=lambda: now[0])
    blobs = {name: split(os.urandom(3000), max_message=2000) for name in ("a", "b", "c")}
    for name, started in (("a", 0.0), ("b", 5.0), ("c", 8.0)):
        now[0] = started
        reassembler.add(name, blobs[name][0])
    now[0] = 9.0
    assert reassembler.add("c", blobs["c"][1]) is not None  # whole: leaves from the middle

    now[0] = 12.0
    assert reassembler.expire() == 1  # a, not b
    assert reassembler.pending == 1
    now[0] = 15.5
    assert reassembler.expire() == 1
    assert reassembler.pending == 0


def test_a_sender_gets_its_room_back_when_its_blobs_complete_or_expire() -> None:
    now = [0.0]
    reassembler = Reassembler(
        max_message=2000, max_partial_per_sender=2, ttl=10, clock=lambda: now[0]
    )
    blobs = [split(os.urandom(3000), max_message=2000) for _ in range(5)]
    reassembler.add("dev", blobs[0][0])
    reassembler.add("dev", blobs[1][0])
    with pytest.raises(ChunkRejected, match="in flight"):
        reassembler.add("dev", blobs[2][0])

    assert reassembler.add("dev", blobs[0][1]) is not None  # one completes: room for one
    reassembler.add("dev", blobs[2][0])
    with pytest.raises(ChunkRejected, match="in flight"):
        reassembler.add("dev", blobs[3][0])

    now[0] = 11.0  # both in flight expire (as the next chunk comes): room for two
    reassembler.add("dev", blobs[3][0])
    reassembler.add("dev", blobs[4][0])
    assert reassembler.pending == 2


# -- signed updates ------------------------------------------------------------------------


def test_signed_update_survives_the_wire_and_verifies() -> None:
    account = Account.create()
    update = make_update(account).signed(account, DOMAIN)

    decoded = Update.decode(update.encode(), 10_000)

    decoded.verify(DOMAIN)
    assert decoded == update
    assert decoded.leaf() == update.leaf()


def test_a_tampered_update_no_longer_verifies() -> None:
    account = Account.create()
    update = make_update(account).signed(account, DOMAIN)
    tampered = Update.decode(update.encode(), 10_000)
    tampered = make_update(account, ciphertext=b"other", signature=tampered.signature)

    with pytest.raises(SignatureError):
        tampered.verify(DOMAIN)


def test_a_signature_is_bound_to_chain_and_contract() -> None:
    account = Account.create()
    update = make_update(account).signed(account, DOMAIN)

    with pytest.raises(SignatureError):
        update.verify(Domain(chain_id=1, contract=DOMAIN.contract))
    with pytest.raises(SignatureError):
        update.verify(Domain(chain_id=DOMAIN.chain_id, contract="0x" + "cd" * 20))


def test_a_device_cannot_sign_for_another() -> None:
    device, forger = Account.create(), Account.create()

    with pytest.raises(SignatureError):
        make_update(device).signed(forger, DOMAIN)


def test_leaf_changes_with_every_signed_field() -> None:
    account = Account.create()
    base = make_update(account, ciphertext=b"c")
    variants = [
        make_update(account, ciphertext=b"c", round=4),
        make_update(account, ciphertext=b"c", samples=1),
        make_update(account, ciphertext=b"c", epsilon_micros=1),
        make_update(account, ciphertext=b"c", data_root=b"\x09" * 32),
        make_update(account, ciphertext=b"c", context=b"\x09" * 32),
        make_update(account, ciphertext=b"d"),
    ]

    assert len({base.leaf(), *(v.leaf() for v in variants)}) == len(variants) + 1


@pytest.mark.parametrize(
    "field, value", [("task", b"\x01" * 31), ("signature", b"\x00" * 64), ("device", b"\x00")]
)
def test_update_decode_checks_field_sizes(field: str, value: bytes) -> None:
    account = Account.create()
    update = make_update(account, signature=b"\x00" * 65)
    fields = envelope.decode(update.encode(), "update", 10_000)
    fields[field] = value

    with pytest.raises(ProtocolError, match=field):
        Update.decode(envelope.encode("update", **fields), 10_000)


# -- Merkle --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_every_leaf_proves_and_a_stranger_does_not(n: int) -> None:
    leaves = [os.urandom(32) for _ in range(n)]
    root = merkle_root(leaves)

    assert all(verify_proof(leaf, merkle_proof(leaves, leaf), root) for leaf in leaves)
    assert not verify_proof(os.urandom(32), merkle_proof(leaves, leaves[0]), root)


def test_root_does_not_depend_on_arrival_order() -> None:
    leaves = [os.urandom(32) for _ in range(6)]

    assert merkle_root(leaves) == merkle_root(list(reversed(leaves)))


def test_merkle_rejects_bad_leaves() -> None:
    leaf = os.urandom(32)
    assert merkle_root([]) == EMPTY_ROOT
    with pytest.raises(ProtocolError):
        merkle_root([leaf, leaf])
    with pytest.raises(ProtocolError):
        merkle_root([b"short"])
    with pytest.raises(ProtocolError):
        merkle_proof([leaf], os.urandom(32))


# -- the update's fields, defined once -----------------------------------------------------

SOLIDITY = Path(__file__).resolve().parent.parent / "contracts" / "Truscl.sol"


def solidity_struct(source: str, name: str) -> list[tuple[str, str]]:
    """(type, member) pairs of ``struct name { ... }``, comments stripped."""
    source = re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.DOTALL)
    match = re.search(rf"\bstruct\s+{name}\s*\{{([^}}]*)\}}", source)
    assert match, f"no struct {name} in the contract"
    members = [m.split() for m in match.group(1).split(";") if m.strip()]
    assert all(len(m) == 2 for m in members), members
    return [(m[0], m[1]) for m in members]


def test_the_update_table_matches_the_solidity_struct() -> None:
    members = solidity_struct(SOLIDITY.read_text(), "Update")

    assert [(f.sol_type, f.name) for f in UPDATE_FIELDS] == members


def test_everything_about_an_update_follows_the_table() -> None:
    assert UPDATE_TYPES["Update"] == [{"name": f.name, "type": f.sol_type} for f in UPDATE_FIELDS]
    assert [f.sol_type for f in UPDATE_FIELDS] == LEAF_ABI
    assert UpdateRecord._fields == tuple(f.attr for f in UPDATE_FIELDS)
    schema = envelope.SCHEMAS["update"]
    assert list(schema) == [*(f.cbor for f in UPDATE_FIELDS), "signature"]
    for f in UPDATE_FIELDS:
        assert schema[f.cbor] is (int if f.sol_type.startswith("uint") else bytes), f


def test_the_contract_struct_takes_the_record_in_table_order() -> None:
    from truscl.chain.reader import update_tuple
    from truscl.contracts import load_artifact

    (leaf_fn,) = [i for i in load_artifact()["abi"] if i.get("name") == "updateLeaf"]
    components = leaf_fn["inputs"][0]["components"]
    record = make_update(Account.create()).record()

    assert [(c["name"], c["type"]) for c in components] == [
        (f.name, f.sol_type) for f in UPDATE_FIELDS
    ]
    assert len(update_tuple(record)) == len(components)


@pytest.mark.parametrize(
    "field, value", [("round", 2**32), ("samples", 2**32), ("epsilon_micros", 2**64)]
)
def test_update_decode_checks_integer_widths(field: str, value: int) -> None:
    account = Account.create()
    fields = envelope.decode(
        make_update(account, signature=b"\x00" * 65).encode(), "update", 10_000
    )
    fields[field] = value

    with pytest.raises(ProtocolError, match=f"update.{field} out of range"):
        Update.decode(envelope.encode("update", **fields), 10_000)


def test_wire_bytes_leaf_and_signature_are_those_of_the_hand_written_fields() -> None:
    # Values computed by the code before the table (commit 398708e): deriving the fields from
    # one table must not change a byte that devices sign or aggregators archive. (The wire
    # bytes' hash changed once since, on purpose: envelope version 2.)
    account = Account.from_key(b"\x11" * 32)
    update = make_update(account, ciphertext=b"ciphertext").signed(account, DOMAIN)

    assert keccak(update.encode()).hex() == (
        "e8b60002a15a670c58c9a84a368f33443416cc864f614629e4eee3acdfbcf286"
    )
    assert update.leaf().hex() == (
        "af79d2f70808c3ba5aeee82d4ee526ee553868d56d39b68e84cf5623f2f0f704"
    )
    assert update.signature.hex() == (
        "c527d3113368b56f687d10df971a7c08579e0c9e7fe293e8f1fa37f8b9e5036c"
        "78a972ed5df1d02354cdc65293321191901e163fe8b326537a6d6b0a3d85d5ea1b"
    )


def test_an_updates_id_commits_to_every_field_and_the_signature() -> None:
    # Prepare: an update, and others that differ from it in one place each
    account = Account.create()
    update = make_update(account, ciphertext=os.urandom(5000)).signed(account, DOMAIN)
    flipped = bytes([update.ciphertext[0] ^ 1]) + update.ciphertext[1:]
    others = [
        replace(update, samples=update.samples + 1),
        replace(update, ciphertext=flipped),
        replace(update, data_root=keccak(b"other data")),
        replace(update, signature=update.signature[:-1] + bytes([update.signature[-1] ^ 1])),
    ]
    reassembler = Reassembler(max_message=2000)
    # Execute: the id, from the update and from its bytes; its chunks through a receiver that
    # leaves the check to the update's parse (as the aggregator does)
    wholes = [reassembler.add_with_id("dev", c, check=False) for c in split_update(update, 2000)]

    # Assert: the id is keccak(leaf ‖ signature), survives the wire, travels in the chunks,
    # and changes with any field, the ciphertext or the signature
    assert update.ident == keccak(update.leaf() + update.signature)
    assert Update.decode(update.encode()).ident == update.ident
    assert wholes[-1] == (update.ident, update.encode())
    assert len({update.ident, *(o.ident for o in others)}) == 1 + len(others)


# -- signatures and receipts ----------------------------------------------------------------


def high_s_twin(signature: bytes) -> bytes:
    """The malleable twin of a valid signature: (r, n - s) with the other recovery id."""
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    twin_v = 27 + (1 - (v - 27)) if v >= 27 else 1 - v
    return r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([twin_v])


def test_a_high_s_twin_of_a_valid_update_signature_is_refused() -> None:
    account = Account.create()
    update = make_update(account).signed(account, DOMAIN)
    twin = replace(update, signature=high_s_twin(update.signature))

    update.verify(DOMAIN)
    with pytest.raises(SignatureError, match="high-s"):
        twin.verify(DOMAIN)


def make_receipt(**overrides: object) -> Receipt:
    fields: dict[str, object] = {
        "task": b"\x01" * 32,
        "round": 3,
        "device": b"\x02" * 20,
        "update": b"\x03" * 32,
        "accepted": True,
        "reason": "",
        "counted_in": 3,
    }
    fields.update(overrides)
    return Receipt(**fields)  # type: ignore[arg-type]


def test_a_receipt_round_trips_and_verifies_only_for_the_aggregator() -> None:
    aggregator, stranger = Account.create(), Account.create()
    receipt = make_receipt().signed(aggregator, DOMAIN)

    again = Receipt.decode(receipt.encode())

    assert again == receipt
    again.verify(DOMAIN, aggregator.address)
    with pytest.raises(SignatureError, match="aggregator"):
        again.verify(DOMAIN, stranger.address)
    forged = make_receipt().signed(stranger, DOMAIN)
    with pytest.raises(SignatureError):
        forged.verify(DOMAIN, aggregator.address)
    altered = replace(receipt, accepted=False, reason="duplicate", counted_in=0)
    with pytest.raises(SignatureError):
        altered.verify(DOMAIN, aggregator.address)
    with pytest.raises(SignatureError, match="high-s"):
        replace(receipt, signature=high_s_twin(receipt.signature)).verify(
            DOMAIN, aggregator.address
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": b"\x01" * 31}, "receipt.task"),
        ({"device": b"\x02" * 21}, "receipt.device"),
        ({"update": b""}, "receipt.update"),
        ({"signature": b"\x00" * 64}, "receipt.signature"),
        ({"round": 2**32}, "out of range"),
    ],
)
def test_a_malformed_receipt_is_refused(overrides: dict[str, object], message: str) -> None:
    fields = {**make_receipt().__dict__, "signature": b"\x00" * 65, **overrides}
    payload = envelope.encode("receipt", **fields)

    with pytest.raises(ProtocolError, match=message):
        Receipt.decode(payload)


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_all_proofs_from_one_tree_are_each_leafs_proof(count: int) -> None:
    leaves = [keccak(os.urandom(8)) for _ in range(count)]

    proofs = merkle_proofs(leaves)

    assert proofs == {leaf: merkle_proof(leaves, leaf) for leaf in leaves}
    assert all(verify_proof(leaf, proofs[leaf], merkle_root(leaves)) for leaf in leaves)
