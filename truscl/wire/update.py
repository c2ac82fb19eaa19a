"""The signed model update: its fields, its EIP-712 signature and its Merkle leaf.

The device signs what the aggregator and auditors must be able to hold it to: which task and
round, which ciphertext (by hash), under which HE context, how many samples, how much privacy
budget it has spent so far, and the Merkle root of the sensor readings it trained on. The
signature is EIP-712 typed data bound to the chain and the contract, so an update cannot be
replayed on another deployment, task or round. The leaf is what the round's Merkle root
commits to; the contract can rebuild it from the same fields with ``abi.encode``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from truscl.errors import ProtocolError, SignatureError
from truscl.wire import envelope

DOMAIN_NAME = "truscl"
DOMAIN_VERSION = "1"

UPDATE_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Update": [
        {"name": "task", "type": "bytes32"},
        {"name": "round", "type": "uint32"},
        {"name": "device", "type": "address"},
        {"name": "ciphertextHash", "type": "bytes32"},
        {"name": "contextHash", "type": "bytes32"},
        {"name": "samples", "type": "uint32"},
        {"name": "epsilonMicros", "type": "uint64"},
        {"name": "dataRoot", "type": "bytes32"},
    ],
}
LEAF_ABI = ["bytes32", "uint32", "address", "bytes32", "bytes32", "uint32", "uint64", "bytes32"]


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

    def leaf(self) -> bytes:
        """OpenZeppelin-style double-hashed leaf: ``keccak(keccak(abi.encode(fields)))``."""
        return keccak(keccak(abi_encode(LEAF_ABI, list(self))))


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

    @property
    def device_address(self) -> str:
        return to_checksum_address(self.device)

    @property
    def ciphertext_hash(self) -> bytes:
        return keccak(self.ciphertext)

    @property
    def epsilon(self) -> float:
        return self.epsilon_micros / 1e6

    def record(self) -> UpdateRecord:
        return UpdateRecord(
            self.task,
            self.round,
            self.device_address,
            self.ciphertext_hash,
            self.context,
            self.samples,
            self.epsilon_micros,
            self.data_root,
        )

    def typed_data(self, domain: Domain) -> dict[str, Any]:
        record = self.record()
        return {
            "types": UPDATE_TYPES,
            "primaryType": "Update",
            "domain": domain.as_dict(),
            "message": {
                "task": record.task,
                "round": record.round,
                "device": record.device,
                "ciphertextHash": record.ciphertext_hash,
                "contextHash": record.context,
                "samples": record.samples,
                "epsilonMicros": record.epsilon_micros,
                "dataRoot": record.data_root,
            },
        }

    def leaf(self) -> bytes:
        return self.record().leaf()

    def signed(self, account: LocalAccount, domain: Domain) -> Update:
        if account.address != self.device_address:
            raise SignatureError("a device signs only its own updates")
        message = encode_typed_data(full_message=self.typed_data(domain))
        return replace(self, signature=bytes(account.sign_message(message).signature))

    def signer(self, domain: Domain) -> str:
        """Address that produced the signature (raises on a malformed one)."""
        try:
            message = encode_typed_data(full_message=self.typed_data(domain))
            return str(Account.recover_message(message, signature=self.signature))
        except Exception as exc:  # eth_keys raises several types for bad signatures
            raise SignatureError(f"unrecoverable signature: {exc}") from None

    def verify(self, domain: Domain) -> None:
        if self.signer(domain) != self.device_address:
            raise SignatureError("signature does not match the claimed device")

    def encode(self) -> bytes:
        return envelope.encode(
            "update",
            task=self.task,
            round=self.round,
            device=self.device,
            ciphertext=self.ciphertext,
            context=self.context,
            samples=self.samples,
            epsilon_micros=self.epsilon_micros,
            data_root=self.data_root,
            signature=self.signature,
        )

    @classmethod
    def decode(cls, blob: bytes, max_bytes: int) -> Update:
        fields = envelope.decode(blob, "update", max_bytes)
        for name, size in (("task", 32), ("device", 20), ("context", 32), ("data_root", 32)):
            if len(fields[name]) != size:
                raise ProtocolError(f"update.{name} must be {size} bytes")
        if len(fields["signature"]) != 65:
            raise ProtocolError("update.signature must be 65 bytes")
        if fields["round"] >= 2**32 or fields["samples"] >= 2**32:
            raise ProtocolError("update round or samples out of range")
        if fields["epsilon_micros"] >= 2**64:
            raise ProtocolError("update.epsilon_micros out of range")
        return cls(**fields)
