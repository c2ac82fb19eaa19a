"""The key holders' messages: distributed key generation and partial decryptions, signed.

In threshold mode the CKKS secret key is split among the owner and its key guardians. What
they exchange travels over MQTT, where the broker's ACL already lets each identity write only
its own topics; each message is also signed (EIP-712, the deployment's domain) with the
holder's chain key, so that a broker operator cannot inject a contribution or a partial
decryption either, and so that the transcript of a key generation holds every holder to what
it published.

Both messages name the holder by its broker identity (``owner``, ``guardian-1``, ...), which is
also its topic segment; the task's spec maps each name to the address that must have signed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from truscl.errors import ProtocolError, SignatureError
from truscl.hashing import keccak
from truscl.wire import envelope
from truscl.wire.signing import (
    DOMAIN_TYPE,
    SIGNATURE_BYTES,
    Domain,
    Signer,
    recover_typed,
    sign_typed,
)

# The steps of a key generation, in order. ``session`` is the owner's call (the holders and the
# CKKS profile); every holder then publishes one message per later step, and waits for every
# other holder's before it takes the next: commit-then-reveal for the seed of the common
# polynomial, then for the public-key contributions, then a signature over the transcript.
SESSION = "session"
SEED_COMMITMENT = "seed-commitment"
SEED_REVEAL = "seed-reveal"
CONTRIBUTION_COMMITMENT = "contribution-commitment"
CONTRIBUTION = "contribution"
TRANSCRIPT = "transcript"
KEYGEN_STEPS = (
    SESSION,
    SEED_COMMITMENT,
    SEED_REVEAL,
    CONTRIBUTION_COMMITMENT,
    CONTRIBUTION,
    TRANSCRIPT,
)
MAX_HOLDER_NAME = 64
# A contribution is (L + 1) x N x 8 bytes: 64 KiB for ckks-4096, 128 KiB for ckks-8192; a
# partial decryption of a vector needs the same per ciphertext at the data level.
MAX_KEYHOLDER_MESSAGE = 4 * 1024 * 1024

KEYGEN_TYPES = {
    "EIP712Domain": DOMAIN_TYPE,
    "Keygen": [
        {"name": "task", "type": "bytes32"},
        {"name": "holder", "type": "string"},
        {"name": "step", "type": "string"},
        {"name": "dataHash", "type": "bytes32"},
    ],
}
PARTIAL_TYPES = {
    "EIP712Domain": DOMAIN_TYPE,
    "Partial": [
        {"name": "task", "type": "bytes32"},
        {"name": "round", "type": "uint32"},
        {"name": "holder", "type": "string"},
        {"name": "aggregateHash", "type": "bytes32"},
        {"name": "partialHash", "type": "bytes32"},
    ],
}


def check_holder_name(name: str) -> str:
    """A holder's name is a topic segment: no MQTT wildcard or separator, bounded length."""
    if (
        not name
        or len(name) > MAX_HOLDER_NAME
        or any(c in name for c in "/+#")
        or not name.isascii()
        or not name.isprintable()
        or " " in name
    ):
        raise ProtocolError(f"{name!r} is not a key holder name")
    return name


def _check_common(kind: str, task: bytes, signature: bytes) -> None:
    if len(task) != 32:
        raise ProtocolError(f"{kind}.task must be 32 bytes")
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(f"{kind}.signature must be {SIGNATURE_BYTES} bytes")


@dataclass(frozen=True)
class KeygenMessage:
    """One holder's message for one step of a task's key generation; ``data`` is the step's
    bytes (a commitment, a seed share, a contribution, the transcript's digest, or for the
    session the CBOR of the holders and the profile), signed by its keccak."""

    task: bytes
    holder: str
    step: str
    data: bytes
    signature: bytes = b""

    def typed_data(self, domain: Domain) -> dict[str, Any]:
        return {
            "types": KEYGEN_TYPES,
            "primaryType": "Keygen",
            "domain": domain.as_dict(),
            "message": {
                "task": self.task,
                "holder": self.holder,
                "step": self.step,
                "dataHash": keccak(self.data),
            },
        }

    def signed(self, account: Signer, domain: Domain) -> KeygenMessage:
        return replace(self, signature=sign_typed(account, self.typed_data(domain)))

    def verify(self, domain: Domain, address: str) -> None:
        """``SignatureError`` unless ``address`` signed this message."""
        if recover_typed(self.typed_data(domain), self.signature).lower() != address.lower():
            raise SignatureError(f"{self.holder}'s {self.step} is not signed by {address}")

    def encode(self) -> bytes:
        return envelope.encode(
            "keygen",
            task=self.task,
            holder=self.holder,
            step=self.step,
            data=self.data,
            signature=self.signature,
        )

    @classmethod
    def decode(cls, blob: bytes, max_bytes: int = MAX_KEYHOLDER_MESSAGE) -> KeygenMessage:
        fields = envelope.decode(blob, "keygen", max_bytes)
        _check_common("keygen", fields["task"], fields["signature"])
        check_holder_name(fields["holder"])
        if fields["step"] not in KEYGEN_STEPS:
            raise ProtocolError(f"keygen.step {fields['step']!r} is not a step")
        return cls(**fields)


@dataclass(frozen=True)
class PartialMessage:
    """A key holder's partial decryption of one round's anchored aggregate (by its keccak)."""

    task: bytes
    round: int
    holder: str
    aggregate: bytes  # keccak of the aggregate ciphertext, as anchored
    partial: bytes  # truscl.privacy.threshold.PartialDecryption.to_bytes()
    signature: bytes = b""

    def typed_data(self, domain: Domain) -> dict[str, Any]:
        return {
            "types": PARTIAL_TYPES,
            "primaryType": "Partial",
            "domain": domain.as_dict(),
            "message": {
                "task": self.task,
                "round": self.round,
                "holder": self.holder,
                "aggregateHash": self.aggregate,
                "partialHash": keccak(self.partial),
            },
        }

    def signed(self, account: Signer, domain: Domain) -> PartialMessage:
        return replace(self, signature=sign_typed(account, self.typed_data(domain)))

    def verify(self, domain: Domain, address: str) -> None:
        if recover_typed(self.typed_data(domain), self.signature).lower() != address.lower():
            raise SignatureError(f"{self.holder}'s partial is not signed by {address}")

    def encode(self) -> bytes:
        return envelope.encode(
            "partial",
            task=self.task,
            round=self.round,
            holder=self.holder,
            aggregate=self.aggregate,
            partial=self.partial,
            signature=self.signature,
        )

    @classmethod
    def decode(cls, blob: bytes, max_bytes: int = MAX_KEYHOLDER_MESSAGE) -> PartialMessage:
        fields = envelope.decode(blob, "partial", max_bytes)
        _check_common("partial", fields["task"], fields["signature"])
        check_holder_name(fields["holder"])
        if len(fields["aggregate"]) != 32:
            raise ProtocolError("partial.aggregate must be 32 bytes")
        if fields["round"] >= 2**32:
            raise ProtocolError("partial.round out of range for uint32")
        return cls(**fields)
