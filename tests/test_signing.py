"""Signature recovery through coincurve, held to eth-account's: the same signer for every
signature eth-account recovers, a refusal for every one it refuses, and high-s refused besides.
The update's hand-made EIP-712 digest is held to eth-account's typed-data encoder likewise."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import keccak

from truscl.errors import SignatureError
from truscl.wire import Domain, Update
from truscl.wire.signing import SECP256K1_N, recover_digest

DOMAIN = Domain(chain_id=31337, contract="0x" + "ab" * 20)
HALF_N = SECP256K1_N // 2


def eth_account_signer(message: SignableMessage, signature: bytes) -> str | None:
    """eth-account's answer (None: it refuses), with the EIP-2 rule every truscl verifier adds:
    what truscl recovered before it recovered through coincurve."""
    if int.from_bytes(signature[32:64], "big") > HALF_N:
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
