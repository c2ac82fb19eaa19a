"""truscl's own EIP-712 hashing and secp256k1 signing and recovery against eth-account's: the
same digests and signatures byte for byte, the same signer for every signature eth-account
recovers and a refusal for every one it refuses, and besides, the high-s twin and any v but 27
and 28 refused."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import SignableMessage, _hash_eip191_message, encode_typed_data
from eth_utils import keccak, to_checksum_address

from truscl.errors import SignatureError
from truscl.wire import Domain, Update
from truscl.wire.keyholders import KeygenMessage, PartialMessage
from truscl.wire.receipt import Receipt
from truscl.wire.signing import (
    SECP256K1_N,
    SigningKey,
    checksum_address,
    encode_static,
    recover_digest,
    recover_typed,
    sign_typed,
    typed_data_hash,
)

HALF_N = SECP256K1_N // 2
DOMAIN = Domain(31337, "0x" + "5a" * 20)


def _messages(device: bytes) -> list[Any]:
    return [
        Update(
            task=os.urandom(32), round=7, device=device, ciphertext=os.urandom(300),
            context=os.urandom(32), samples=864, epsilon_micros=1_234_567,
            data_root=os.urandom(32),
        ),
        Receipt(os.urandom(32), 3, device, os.urandom(32), False, "late: round 3 closed", 0),
        Receipt(os.urandom(32), 3, device, os.urandom(32), True, "", 4),
        KeygenMessage(os.urandom(32), "guardian-1", "share", os.urandom(100)),
        PartialMessage(os.urandom(32), 9, "owner", os.urandom(32), os.urandom(64)),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(5))
def test_digests_and_signatures_are_eth_accounts(index: int) -> None:
    # Prepare
    account = Account.create()
    message = _messages(bytes.fromhex(account.address[2:]))[index]
    typed = message.typed_data(DOMAIN)
    theirs = encode_typed_data(full_message=typed)

    # Execute
    signature = sign_typed(account, typed)

    # Assert: the same digest, the same (deterministic, RFC 6979) signature, the same signer
    assert typed_data_hash(typed) == _hash_eip191_message(theirs)
    assert signature == bytes(account.sign_message(theirs).signature)
    assert recover_typed(typed, signature) == account.address
    assert Account.recover_message(theirs, signature=signature) == account.address
    assert message.signed(account, DOMAIN).signature == signature  # each type's own path


def test_a_signing_key_is_the_same_identity_as_its_account() -> None:
    key = SigningKey.create()
    account = Account.from_key(key.key)
    typed = _messages(bytes.fromhex(key.address[2:]))[0].typed_data(DOMAIN)

    assert key.address == account.address
    assert sign_typed(key, typed) == sign_typed(account, typed)


@pytest.mark.parametrize("key", [bytes(32), b"\xff" * 32, b"\x01" * 31])
def test_an_invalid_private_key_is_refused(key: bytes) -> None:
    with pytest.raises(ValueError):
        SigningKey.from_key(key)


def test_a_signature_with_a_bad_v_or_bad_r_is_refused() -> None:
    key = SigningKey.create()
    typed = _messages(bytes.fromhex(key.address[2:]))[0].typed_data(DOMAIN)
    signature = sign_typed(key, typed)

    with pytest.raises(SignatureError, match=r"v is [01], not 27 or 28"):
        recover_typed(typed, signature[:64] + bytes([signature[64] - 27]))
    with pytest.raises(SignatureError, match="unrecoverable"):
        recover_typed(typed, bytes(32) + signature[32:])


def test_a_changed_message_recovers_another_signer() -> None:
    key = SigningKey.create()
    typed = _messages(bytes.fromhex(key.address[2:]))[1].typed_data(DOMAIN)
    signature = sign_typed(key, typed)
    typed["message"]["reason"] = "accepted after all"

    assert recover_typed(typed, signature) != key.address


def test_types_truscl_does_not_sign_are_refused() -> None:
    typed = {
        "types": {"EIP712Domain": [], "Batch": [{"name": "items", "type": "uint256[]"}]},
        "primaryType": "Batch",
        "domain": {},
        "message": {"items": [1, 2]},
    }
    with pytest.raises(ValueError, match="not supported"):
        typed_data_hash(typed)


def eth_account_signer(message: SignableMessage, signature: bytes) -> str | None:
    """eth-account's answer (None: it refuses), with the two rules every truscl verifier adds:
    s at most n/2 (EIP-2) and v 27 or 28 (one encoding per signature)."""
    if int.from_bytes(signature[32:64], "big") > HALF_N or signature[64] not in (27, 28):
        return None
    try:
        return str(Account.recover_message(message, signature=signature))
    except Exception:
        return None


def ours(update: Update, signature: bytes) -> str | None:
    try:
        return replace(update, signature=signature).signer(DOMAIN)
    except SignatureError:
        return None


def random_update(rng: random.Random, account: Account) -> Update:
    return Update(
        task=rng.randbytes(32),
        round=rng.randrange(2**32),
        device=bytes.fromhex(account.address[2:]),
        ciphertext=rng.randbytes(rng.randrange(1, 5000)),
        context=rng.randbytes(32),
        samples=rng.randrange(2**32),
        epsilon_micros=rng.randrange(2**64),
        data_root=rng.randbytes(32),
    )


def word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def edge_signatures(rng: random.Random, valid: bytes) -> list[bytes]:
    r, s, v = valid[:32], valid[32:64], valid[64]
    s_int = int.from_bytes(s, "big")
    cases = [
        valid,
        r + s + bytes([v - 27]),  # v as 0/1
        r + s + bytes([1 - (v - 27) + 27]),  # the other recovery id: another key, or none
        r + s + bytes([v + 8]),  # 35/36: EIP-155 parity
        r + s + bytes([255]),
        r + s + bytes([2]),
        r + s + bytes([26]),
        r + s + bytes([29]),
        r + s + bytes([34]),
        word(0) + s + bytes([v]),
        r + word(0) + bytes([v]),
        word(SECP256K1_N) + s + bytes([v]),
        word(SECP256K1_N - 1) + s + bytes([v]),
        word(2**256 - 1) + s + bytes([v]),
        r + word(HALF_N) + bytes([v]),
        r + word(HALF_N + 1) + bytes([v]),
        r + word(SECP256K1_N - s_int) + bytes([v]),  # the high-s twin
        r + word(SECP256K1_N) + bytes([v]),
    ]
    for _ in range(40):  # random r, s, v: most recover to some key, some to none
        cases.append(rng.randbytes(64) + bytes([rng.choice([0, 1, 27, 28, 37, 38, 3, 200])]))
    return cases


def test_recovery_matches_eth_account_on_random_and_edge_case_signatures() -> None:
    rng = random.Random(2026)
    agreed = recovered = 0
    for _ in range(25):
        account = Account.from_key(rng.randbytes(32))
        update = random_update(rng, account).signed(account, DOMAIN)
        message = encode_typed_data(full_message=update.typed_data(DOMAIN))
        assert ours(update, update.signature) == account.address
        for signature in edge_signatures(rng, update.signature):
            expected = eth_account_signer(message, signature)
            assert ours(update, signature) == expected, signature.hex()
            agreed += 1
            recovered += expected is not None
    assert agreed == 25 * 58 and 0 < recovered < agreed  # both outcomes were exercised


@pytest.mark.parametrize("length", [0, 64, 66])
def test_a_signature_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(SignatureError, match="65 bytes"):
        recover_digest(b"\x00" * 32, b"\x01" * length)


def test_the_update_digest_is_eth_accounts_typed_data_hash() -> None:
    rng = random.Random(7)
    for _ in range(20):
        account = Account.from_key(rng.randbytes(32))
        domain = Domain(rng.randrange(1, 2**64), "0x" + rng.randbytes(20).hex())
        update = random_update(rng, account)
        message = encode_typed_data(full_message=update.typed_data(domain))
        reference = keccak(b"\x19" + message.version + message.header + message.body)

        assert domain.digest(update.record().struct_hash()) == reference
        signed = update.signed(account, domain)
        assert signed.signer(domain) == account.address
        assert signed.signer(DOMAIN) != account.address  # bound to its domain


def test_signatures_are_byte_for_byte_eth_accounts() -> None:
    rng = random.Random(11)
    for _ in range(30):
        account = Account.from_key(rng.randbytes(32))
        update = random_update(rng, account)
        message = encode_typed_data(full_message=update.typed_data(DOMAIN))

        assert update.signed(account, DOMAIN).signature == account.sign_message(message).signature


STATIC_KINDS = ["bytes32", "uint32", "uint64", "uint256", "address", "bool", "bytes4"]


def _static_values(rng: random.Random) -> list[Any]:
    return [
        rng.randbytes(32),
        rng.choice([0, 1, 2**32 - 1, rng.getrandbits(32)]),
        rng.choice([0, 2**64 - 1, rng.getrandbits(64)]),
        rng.choice([0, 2**256 - 1, rng.getrandbits(256)]),
        to_checksum_address(rng.randbytes(20)),
        rng.random() < 0.5,
        rng.randbytes(rng.randrange(5)),
    ]


def test_static_abi_encoding_is_eth_abis() -> None:
    rng = random.Random(712)
    for _ in range(500):
        values = _static_values(rng)
        assert encode_static(STATIC_KINDS, values) == abi_encode(STATIC_KINDS, values)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("uint32", 2**32), ("uint32", -1), ("uint32", True), ("uint32", "7"), ("bool", 1),
        ("bytes32", bytes(33)), ("bytes4", "0x00"), ("address", bytes(19)),
        ("address", 7), ("string", "x"), ("int8", 1), ("uint32[]", [1]),
    ],
)  # fmt: skip
def test_static_abi_encoding_refuses_what_its_type_cannot_hold(kind: str, value: Any) -> None:
    with pytest.raises(ValueError):
        encode_static([kind], [value])


def test_checksum_addresses_are_eth_utils() -> None:
    rng = random.Random(55)
    for raw in [bytes(20), b"\xff" * 20] + [rng.randbytes(20) for _ in range(500)]:
        assert checksum_address(raw) == to_checksum_address(raw)
