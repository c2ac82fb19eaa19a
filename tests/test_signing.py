"""truscl's own EIP-712 hashing and secp256k1 signing against eth-account's, byte for byte."""

from __future__ import annotations

import os
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data

from truscl.errors import SignatureError
from truscl.wire import Domain, Update
from truscl.wire.keyholders import KeygenMessage, PartialMessage
from truscl.wire.receipt import Receipt
from truscl.wire.signing import SigningKey, recover_typed, sign_typed, typed_data_hash

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
