"""The signed model update: its fields, its EIP-712 signature and its Merkle leaf.

The device signs what the aggregator and auditors must be able to hold it to: which task and
round, which ciphertext (by hash), under which HE context, how many samples, how much privacy
budget it has spent so far, and the Merkle root of the sensor readings it trained on. The
signature is EIP-712 typed data bound to the chain and the contract, so an update cannot be
replayed on another deployment, task or round. The leaf is what the round's Merkle root
commits to; the contract can rebuild it from the same fields with ``abi.encode``.

The ciphertext is by far the largest thing hashed (keccak runs at ~0.47 GB/s, ~0.28 ms for an
8,000-parameter update): an ``Update`` hashes it once, and the record, the EIP-712 struct hash,
the leaf and the update's id all come from that digest. Every field is a static ABI type, so the
struct's ``encodeData`` is the leaf's ``abi.encode`` of the same values, encoded once too.

The update's id (``ident``: what its chunks, its receipt, the outbox and the archive name it by)
is ``keccak(leaf ‖ signature)``: it commits to every byte that matters (every field, the
ciphertext through its hash, the signature) without hashing the ciphertext a second time, as a
keccak of the whole message would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

from truscl.errors import ProtocolError, SignatureError
from truscl.hashing import keccak
from truscl.wire import envelope
from truscl.wire.signing import (
    DOMAIN_TYPE,
    SIGNATURE_BYTES,
    Domain,
    Signer,
    checksum_address,
    encode_static,
    recover_digest,
    sign_digest,
)

# Largest signed update the aggregator and the auditor accept, in bytes of CBOR: a CKKS
# ciphertext of the task's model with room to spare. One number, so that what the aggregator
# takes in and what the audit reads back cannot drift apart.
MAX_UPDATE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class UpdateField:
    """One field of the signed update, named in each of the places it appears.

    ``name`` and ``sol_type`` are the member of ``struct Update`` in ``Truscl.sol`` and of the
    EIP-712 type (the same ABI type encodes the Merkle leaf); ``attr`` is the attribute of
    :class:`UpdateRecord`; ``cbor`` is the key in the CBOR envelope and the attribute of
    :class:`Update`. ``hashed`` marks the one field that travels whole but is signed by its
    keccak (the ciphertext): the signature and the leaf stay 32 bytes whatever the model size.
    """

    name: str
    sol_type: str
    attr: str
    cbor: str
    hashed: bool = False

    @property
    def size(self) -> int | None:
        """Exact length in bytes on the wire, for ``bytesN`` and ``address`` fields."""
        if self.hashed:
            return None
        if self.sol_type == "address":
            return 20
        if self.sol_type.startswith("bytes"):
            return int(self.sol_type.removeprefix("bytes"))
        return None

    @property
    def bits(self) -> int | None:
        """Width of a ``uintN`` field, whose CBOR integer must fit in it."""
        if self.sol_type.startswith("uint"):
            return int(self.sol_type.removeprefix("uint"))
        return None


# The single definition of the update's fields, in signing order. Everything else is derived
# from it: the EIP-712 type, the leaf's ABI types, the wire checks of ``Update.decode``, the
# order of ``UpdateRecord`` and the tuple the contract takes. tests/test_wire.py checks it
# against ``struct Update`` in contracts/Truscl.sol.
UPDATE_FIELDS: tuple[UpdateField, ...] = (
    UpdateField("task", "bytes32", "task", "task"),
    UpdateField("round", "uint32", "round", "round"),
    UpdateField("device", "address", "device", "device"),
    UpdateField("ciphertextHash", "bytes32", "ciphertext_hash", "ciphertext", hashed=True),
    UpdateField("contextHash", "bytes32", "context", "context"),
    UpdateField("samples", "uint32", "samples", "samples"),
    UpdateField("epsilonMicros", "uint64", "epsilon_micros", "epsilon_micros"),
    UpdateField("dataRoot", "bytes32", "data_root", "data_root"),
)

UPDATE_TYPES = {
    "EIP712Domain": DOMAIN_TYPE,
    "Update": [{"name": f.name, "type": f.sol_type} for f in UPDATE_FIELDS],
}
LEAF_ABI = [f.sol_type for f in UPDATE_FIELDS]
UPDATE_TYPEHASH = keccak(
    ("Update(" + ",".join(f"{f.sol_type} {f.name}" for f in UPDATE_FIELDS) + ")").encode()
)


class UpdateRecord(NamedTuple):
    """What a round's Merkle tree commits to for one update: the signed fields, with the
    ciphertext by its hash. The contract's ``updateLeaf`` hashes the same tuple."""

    task: bytes
    round: int
    device: str  # checksum address
    ciphertext_hash: bytes
    context: bytes
    samples: int
    epsilon_micros: int
    data_root: bytes

    @property
    def epsilon(self) -> float:
        return self.epsilon_micros / 1e6

    def encoded(self) -> bytes:
        """``abi.encode`` of the fields: the leaf's preimage and the struct's ``encodeData``."""
        return encode_static(LEAF_ABI, list(self))

    def leaf(self, encoded: bytes | None = None) -> bytes:
        """OpenZeppelin-style double-hashed leaf: ``keccak(keccak(abi.encode(fields)))``."""
        return keccak(keccak(self.encoded() if encoded is None else encoded))

    def struct_hash(self, encoded: bytes | None = None) -> bytes:
        """EIP-712 ``hashStruct`` of the ``Update`` message."""
        return keccak(UPDATE_TYPEHASH + (self.encoded() if encoded is None else encoded))

    def message(self) -> dict[str, Any]:
        """The EIP-712 ``Update`` message: the same values under the Solidity names."""
        return {f.name: getattr(self, f.attr) for f in UPDATE_FIELDS}


# A NamedTuple's fields must be spelled out for the type checker, so the table cannot generate
# them; it checks them instead, at import, so a field added in one place only fails at once.
if UpdateRecord._fields != tuple(f.attr for f in UPDATE_FIELDS):
    raise ImportError(
        f"UpdateRecord fields {UpdateRecord._fields} differ from UPDATE_FIELDS "
        f"{tuple(f.attr for f in UPDATE_FIELDS)}"
    )


@dataclass(frozen=True)
class Update:
    task: bytes
    round: int
    device: bytes  # 20-byte address
    ciphertext: bytes
    context: bytes  # keccak of the public HE context the ciphertext was made under
    samples: int
    epsilon_micros: int
    data_root: bytes
    signature: bytes = b""

    @functools.cached_property
    def device_address(self) -> str:
        return checksum_address(self.device)

    @functools.cached_property
    def ciphertext_hash(self) -> bytes:
        return keccak(self.ciphertext)

    @functools.cached_property
    def _record(self) -> UpdateRecord:
        values: list[Any] = []
        for f in UPDATE_FIELDS:
            value = getattr(self, f.cbor)
            if f.hashed:
                value = self.ciphertext_hash if f.cbor == "ciphertext" else keccak(value)
            elif f.sol_type == "address":
                value = checksum_address(value)
            values.append(value)
        return UpdateRecord(*values)

    @functools.cached_property
    def _encoded(self) -> bytes:
        return self._record.encoded()

    @property
    def epsilon(self) -> float:
        return self.epsilon_micros / 1e6

    def record(self) -> UpdateRecord:
        """The signed fields: hashed ones by their keccak, the device as a checksum address."""
        return self._record

    def typed_data(self, domain: Domain) -> dict[str, Any]:
        return {
            "types": UPDATE_TYPES,
            "primaryType": "Update",
            "domain": domain.as_dict(),
            "message": self.record().message(),
        }

    def leaf(self) -> bytes:
        return self._record.leaf(self._encoded)

    @functools.cached_property
    def ident(self) -> bytes:
        """The update's id: ``keccak(leaf ‖ signature)`` (see the module's docstring)."""
        return keccak(self.leaf() + self.signature)

    def signed(self, account: Signer, domain: Domain) -> Update:
        if account.address != self.device_address:
            raise SignatureError("a device signs only its own updates")
        digest = domain.digest(self._record.struct_hash(self._encoded))
        return replace(self, signature=sign_digest(account, digest))

    def signer(self, domain: Domain) -> str:
        """Address that produced the signature (raises on a malformed or high-s one)."""
        struct_hash = self._record.struct_hash(self._encoded)
        return recover_digest(domain.digest(struct_hash), self.signature)

    def verify(self, domain: Domain) -> None:
        if self.signer(domain) != self.device_address:
            raise SignatureError("signature does not match the claimed device")

    def encode(self) -> bytes:
        fields = {f.cbor: getattr(self, f.cbor) for f in UPDATE_FIELDS}
        return envelope.encode("update", **fields, signature=self.signature)

    @classmethod
    def decode(cls, blob: bytes, max_bytes: int = MAX_UPDATE_BYTES) -> Update:
        """Parse and bound-check an update from the network (the signature is not checked)."""
        fields = envelope.decode(blob, "update", max_bytes)
        for f in UPDATE_FIELDS:
            value = fields[f.cbor]
            if f.size is not None and len(value) != f.size:
                raise ProtocolError(f"update.{f.cbor} must be {f.size} bytes")
            if f.bits is not None and value >= 2**f.bits:
                raise ProtocolError(f"update.{f.cbor} out of range for {f.sol_type}")
        if len(fields["signature"]) != SIGNATURE_BYTES:
            raise ProtocolError(f"update.signature must be {SIGNATURE_BYTES} bytes")
        return cls(**fields)


if tuple(f.name for f in fields(Update)) != (*(f.cbor for f in UPDATE_FIELDS), "signature"):
    raise ImportError("Update's attributes differ from UPDATE_FIELDS' CBOR names")
