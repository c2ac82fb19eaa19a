"""The aggregator's signed receipt for one update.

A device deletes an update from its outbox only on a receipt it can hold the aggregator to: an
EIP-712 signature by the key the chain names as the task's aggregator, over the update's id
(the keccak of its signed bytes), the round it was made for, the device that signed it, whether
it was accepted and why not, and the round whose aggregate counts it. Anyone else on the broker
can publish on a device's receipt topic; nobody else can make such a receipt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from eth_utils import to_checksum_address

from truscl.errors import ProtocolError, SignatureError
from truscl.wire import envelope
from truscl.wire.signing import (
    DOMAIN_TYPE,
    SIGNATURE_BYTES,
    Domain,
    Signer,
    checksum_address,
    hash_struct,
    recover_digest,
    sign_digest,
)

RECEIPT_TYPES = {
    "EIP712Domain": DOMAIN_TYPE,
    "Receipt": [
        {"name": "task", "type": "bytes32"},
        {"name": "round", "type": "uint32"},
        {"name": "device", "type": "address"},
        {"name": "update", "type": "bytes32"},
        {"name": "accepted", "type": "bool"},
        {"name": "reason", "type": "string"},
        {"name": "countedIn", "type": "uint32"},
    ],
}
MAX_RECEIPT_BYTES = 1024


@dataclass(frozen=True)
class Receipt:
    task: bytes
    round: int  # the round the update was made for
    device: bytes  # 20 bytes: the update's signer, whose receipt topic this goes to
    update: bytes  # the update's id: keccak of its signed bytes
    accepted: bool
    reason: str  # why it was rejected ("" when accepted)
    counted_in: int  # the round whose aggregate counts it; 0 when rejected
    signature: bytes = b""

    @property
    def device_address(self) -> str:
        return checksum_address(self.device)

    def typed_data(self, domain: Domain) -> dict[str, Any]:
        return {
            "types": RECEIPT_TYPES,
            "primaryType": "Receipt",
            "domain": domain.as_dict(),
            "message": self._message(),
        }

    def _message(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "round": self.round,
            "device": self.device_address,
            "update": self.update,
            "accepted": self.accepted,
            "reason": self.reason,
            "countedIn": self.counted_in,
        }

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 digest of :meth:`typed_data`, from the domain's separator."""
        return domain.digest(hash_struct("Receipt", RECEIPT_TYPES["Receipt"], self._message()))

    def signed(self, account: Signer, domain: Domain) -> Receipt:
        return replace(self, signature=sign_digest(account, self.digest(domain)))

    def verify(self, domain: Domain, aggregator: str) -> None:
        """Raise unless the task's aggregator (an address the chain names) signed this."""
        try:
            digest = self.digest(domain)
        except ValueError as exc:
            raise SignatureError(f"unencodable receipt: {exc}") from None
        if recover_digest(digest, self.signature) != to_checksum_address(aggregator):
            raise SignatureError("receipt is not signed by the task's aggregator")

    def encode(self) -> bytes:
        return envelope.encode(
            "receipt",
            task=self.task,
            round=self.round,
            device=self.device,
            update=self.update,
            accepted=self.accepted,
            reason=self.reason,
            counted_in=self.counted_in,
            signature=self.signature,
        )

    @classmethod
    def decode(cls, payload: bytes) -> Receipt:
        fields = envelope.decode(payload, "receipt", MAX_RECEIPT_BYTES)
        for name, size in (("task", 32), ("device", 20), ("update", 32)):
            if len(fields[name]) != size:
                raise ProtocolError(f"receipt.{name} must be {size} bytes")
        if len(fields["signature"]) != SIGNATURE_BYTES:
            raise ProtocolError(f"receipt.signature must be {SIGNATURE_BYTES} bytes")
        if not (0 <= fields["round"] < 2**32 and 0 <= fields["counted_in"] < 2**32):
            raise ProtocolError("receipt round out of range")
        return cls(**fields)
