"""EIP-712 signatures, recovered strictly.

ECDSA signatures are malleable: for a valid (r, s) the twin (r, n - s) verifies too, so a
signed message would have two encodings, two blob ids, two archive entries. Ethereum rejects
the high-s twin since EIP-2, and so does every truscl verifier (the aggregator, the devices,
the audit): a signature whose s is above n/2 is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.contract),
        }


def sign_typed(account: LocalAccount, typed_data: dict[str, Any]) -> bytes:
    message = encode_typed_data(full_message=typed_data)
    return bytes(account.sign_message(message).signature)  # eth-account signs low-s


def recover_typed(typed_data: dict[str, Any], signature: bytes) -> str:
    """The checksum address that signed ``typed_data``; ``SignatureError`` for a malformed or
    high-s signature."""
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes, not {len(signature)}")
    if int.from_bytes(signature[32:64], "big") > SECP256K1_N // 2:
        raise SignatureError("high-s signature (EIP-2): the malleable twin of a valid one")
    try:
        message = encode_typed_data(full_message=typed_data)
        return str(Account.recover_message(message, signature=signature))
    except Exception as exc:  # eth_keys raises several types for bad signatures
        raise SignatureError(f"unrecoverable signature: {exc}") from None
