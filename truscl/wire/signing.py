"""EIP-712 signatures, recovered strictly.

ECDSA signatures are malleable: for a valid (r, s) the twin (r, n - s) verifies too, so a
signed message would have two encodings, two blob ids, two archive entries. Ethereum rejects
the high-s twin since EIP-2, and so does every truscl verifier (the aggregator, the devices,
the audit): a signature whose s is above n/2 is refused.

Recovery goes straight to libsecp256k1 through coincurve (what eth-account reaches too, under
~100 us of Python around it), from the 32-byte EIP-712 digest; a message type whose struct hash
is already known (:mod:`truscl.wire.update`) skips eth-account's generic typed-data encoder.
tests/test_signing.py holds the result to eth-account's on random and malformed signatures.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from coincurve import PrivateKey, PublicKey
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from truscl.errors import SignatureError

DOMAIN_NAME = "truscl"
DOMAIN_VERSION = "1"
DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SIGNATURE_BYTES = 65  # r, s, v


@dataclass(frozen=True)
class Domain:
    """Where signatures are valid: one chain, one contract."""

    chain_id: int
    contract: str

    @functools.cached_property
    def separator(self) -> bytes:
        """EIP-712 ``domainSeparator``: the hash every digest under this domain starts from."""
        return bytes(encode_typed_data(self.as_dict(), {"Empty": []}, {}).header)

    def digest(self, struct_hash: bytes) -> bytes:
        """The EIP-712 digest of a message whose ``hashStruct`` is ``struct_hash``."""
        return keccak(b"\x19\x01" + self.separator + struct_hash)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.contract),
        }


def typed_digest(typed_data: dict[str, Any]) -> bytes:
    """The EIP-712 digest of ``typed_data`` (eth-account's generic encoder)."""
    message = encode_typed_data(full_message=typed_data)
    return keccak(b"\x19" + message.version + message.header + message.body)


def sign_typed(account: LocalAccount, typed_data: dict[str, Any]) -> bytes:
    return sign_digest(account, typed_digest(typed_data))


def sign_digest(account: LocalAccount, digest: bytes) -> bytes:
    """r, s, v over a 32-byte digest: libsecp256k1's deterministic (RFC 6979), low-s signature,
    byte for byte what eth-account makes with the same key, v being 27 or 28."""
    signature = PrivateKey(account.key).sign_recoverable(digest, hasher=None)
    return signature[:64] + bytes([27 + signature[64]])


def recover_typed(typed_data: dict[str, Any], signature: bytes) -> str:
    """The checksum address that signed ``typed_data``; ``SignatureError`` for a malformed or
    high-s signature."""
    try:
        digest = typed_digest(typed_data)
    except Exception as exc:  # eth-account raises several types for malformed typed data
        raise SignatureError(f"unencodable typed data: {exc}") from None
    return recover_digest(digest, signature)


def recover_digest(digest: bytes, signature: bytes) -> str:
    """The checksum address whose key made ``signature`` (r, s, v) over the 32-byte ``digest``.

    Accepted as eth-account accepts them: v is 27 or 28, 0 or 1, or an EIP-155 value (35 and
    up, its parity); r and s below the group order; and, stricter, s at most n/2 (EIP-2).
    """
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes, not {len(signature)}")
    r, s, v = (
        int.from_bytes(signature[:32], "big"),
        int.from_bytes(signature[32:64], "big"),
        signature[64],
    )
    if s > SECP256K1_N // 2:
        raise SignatureError("high-s signature (EIP-2): the malleable twin of a valid one")
    if r >= SECP256K1_N:
        raise SignatureError("unrecoverable signature: r is not below the group order")
    if v in (27, 28):
        v -= 27
    elif v >= 35:
        v = (v - 35) % 2
    elif v not in (0, 1):
        raise SignatureError(f"unrecoverable signature: v = {v}")
    try:
        key = PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception as exc:  # libsecp256k1 refuses r = 0, s = 0, or no point for r
        raise SignatureError(f"unrecoverable signature: {exc}") from None
    return to_checksum_address(keccak(key.format(compressed=False)[1:])[-20:])
