"""EIP-712 signatures, recovered strictly.

ECDSA signatures are malleable: for a valid (r, s) the twin (r, n - s) verifies too, so a
signed message would have two encodings, two blob ids, two archive entries. Ethereum rejects
the high-s twin since EIP-2, and so does every truscl verifier (the aggregator, the devices,
the audit): a signature whose s is above n/2 is refused.

Hashing (EIP-712, for the flat structs of atomic types truscl signs) and the secp256k1 work
(libsecp256k1 through coincurve, RFC 6979 nonces: the signatures eth-account makes, byte for
byte) are done here rather than through eth-account, whose import (its keystore module loads
BLS pairing code) takes longer than a device's whole round; tests/test_signing.py checks both
against eth-account. Any key with ``address`` and ``key`` signs: a role's ``LocalAccount`` or
a device's :class:`SigningKey`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import coincurve
from eth_utils import to_checksum_address

from truscl.errors import SignatureError
from truscl.hashing import keccak

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
        return hash_struct("EIP712Domain", DOMAIN_TYPE, self.as_dict())

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


class Signer(Protocol):
    """A secp256k1 key and its Ethereum address (eth-account's ``LocalAccount`` is one)."""

    @property
    def address(self) -> str: ...

    @property
    def key(self) -> bytes: ...


@dataclass(frozen=True)
class SigningKey:
    """A private key and its address, without eth-account: what a device signs with."""

    key: bytes
    address: str

    @classmethod
    def from_key(cls, key: bytes) -> SigningKey:
        """``ValueError`` for a key that is zero or not below the curve order."""
        if len(key) != 32 or not 0 < int.from_bytes(key, "big") < SECP256K1_N:
            raise ValueError("a secp256k1 private key is 32 bytes, in (0, n)")
        public = coincurve.PrivateKey(bytes(key)).public_key.format(compressed=False)
        return cls(bytes(key), _address(public))

    @classmethod
    def create(cls) -> SigningKey:
        return cls.from_key(coincurve.PrivateKey().secret)


def typed_data_hash(typed_data: dict[str, Any]) -> bytes:
    """The EIP-712 digest ``keccak(0x1901 ‖ domainSeparator ‖ hashStruct(message))``.

    Only what truscl signs: structs whose members are atomic types or strings (no arrays, no
    nested structs), which keeps ``encodeType`` to the primary type alone.
    """
    types = typed_data["types"]
    domain = hash_struct("EIP712Domain", types["EIP712Domain"], typed_data["domain"])
    primary = typed_data["primaryType"]
    message = hash_struct(primary, types[primary], typed_data["message"])
    return keccak(b"\x19\x01" + domain + message)


def hash_struct(name: str, members: list[dict[str, str]], values: dict[str, Any]) -> bytes:
    kinds, encoded = ["bytes32"], [keccak(_encode_type(name, members).encode())]
    for member in members:
        kind, value = member["type"], values[member["name"]]
        if kind == "string":
            kind, value = "bytes32", keccak(value.encode())
        elif kind == "bytes":
            kind, value = "bytes32", keccak(value)
        elif kind.endswith("]") or kind[0].isupper():
            raise ValueError(f"EIP-712 type {kind} of {name}.{member['name']} is not supported")
        kinds.append(kind)
        encoded.append(value)
    return keccak(encode_static(kinds, encoded))


def encode_static(kinds: Sequence[str], values: Sequence[Any]) -> bytes:
    """``abi.encode`` of atomic static values (``uintN``, ``bool``, ``address``, ``bytesN``):
    one 32-byte word each, byte for byte eth-abi's encoding (``tests/test_signing.py``) without
    its per-call cost, which was most of signing a receipt. ``ValueError`` for a value its type
    cannot hold."""
    words = []
    for kind, value in zip(kinds, values, strict=True):
        if kind == "address":
            raw = bytes.fromhex(value[2:]) if isinstance(value, str) else value
            if not isinstance(raw, bytes) or len(raw) != 20:
                raise ValueError(f"not an address: {value!r}")
            words.append(bytes(12) + raw)
        elif kind == "bool" and isinstance(value, bool):
            words.append(int(value).to_bytes(32, "big"))
        elif kind.startswith("uint") and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < 2 ** int(kind[4:]):
                raise ValueError(f"{value} is out of range for {kind}")
            words.append(value.to_bytes(32, "big"))
        elif kind.startswith("bytes") and kind[5:].isdigit() and isinstance(value, bytes):
            if len(value) > int(kind[5:]):
                raise ValueError(f"{len(value)} bytes do not fit {kind}")
            words.append(value.ljust(32, b"\0"))
        else:
            raise ValueError(f"cannot encode {value!r} as {kind}")
    return b"".join(words)


def checksum_address(raw: bytes) -> str:
    """The EIP-55 checksum address of 20 bytes: eth-utils' ``to_checksum_address`` with the
    fast keccak (``tests/test_signing.py`` holds the two equal)."""
    lower = raw.hex()
    nibbles = keccak(lower.encode()).hex()[:40]
    return "0x" + "".join(c.upper() if n >= "8" else c for c, n in zip(lower, nibbles, strict=True))


def _encode_type(name: str, members: list[dict[str, str]]) -> str:
    fields = ",".join(f"{member['type']} {member['name']}" for member in members)
    return f"{name}({fields})"


def _address(public_key: bytes) -> str:
    """The checksum address of an uncompressed public key (0x04 ‖ x ‖ y)."""
    return checksum_address(keccak(public_key[1:])[-20:])


def sign_typed(account: Signer, typed_data: dict[str, Any]) -> bytes:
    return sign_digest(account, typed_data_hash(typed_data))


def sign_digest(account: Signer, digest: bytes) -> bytes:
    """r ‖ s ‖ v over a 32-byte digest: libsecp256k1's deterministic (RFC 6979), low-s
    signature, byte for byte what eth-account makes with the same key, v = 27 + recovery id."""
    signature = _private_key(bytes(account.key)).sign_recoverable(digest, hasher=None)
    return signature[:64] + bytes([27 + signature[64]])


@functools.lru_cache(maxsize=4)
def _private_key(key: bytes) -> coincurve.PrivateKey:
    """libsecp256k1's key object, made once per key (making it derives the public key): a
    service signs every receipt with the same key."""
    return coincurve.PrivateKey(key)


def recover_typed(typed_data: dict[str, Any], signature: bytes) -> str:
    """The checksum address that signed ``typed_data``; ``SignatureError`` for a malformed or
    high-s signature."""
    try:
        digest = typed_data_hash(typed_data)
    except (KeyError, TypeError, ValueError) as exc:
        raise SignatureError(f"unencodable typed data: {exc}") from None
    return recover_digest(digest, signature)


def recover_digest(digest: bytes, signature: bytes) -> str:
    """The checksum address whose key made ``signature`` (r ‖ s ‖ v) over the 32-byte ``digest``.

    One encoding per signature: v is 27 or 28 (eth-account also takes 0, 1 and EIP-155
    values, which would give one signature several byte strings, hence several blob ids), r
    and s below the group order, and s at most n/2 (EIP-2).
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
    if v not in (27, 28):
        raise SignatureError(f"unrecoverable signature: v is {v}, not 27 or 28")
    if r >= SECP256K1_N:
        raise SignatureError("unrecoverable signature: r is not below the group order")
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes([v - 27]), digest, hasher=None
        )
    except Exception as exc:  # libsecp256k1 refuses r = 0, s = 0, or no point for r
        raise SignatureError(f"unrecoverable signature: {exc}") from None
    return _address(public.format(compressed=False))
