"""The aggregator's round logic, free of I/O.

``OpenRound.offer`` takes the bytes of one reassembled update and returns a decision;
``close`` returns what gets archived, anchored and sent on. MQTT, the archive and the chain
are adapters around it (see :mod:`server.aggregator`), so tests, the simulator and a
deployment run exactly this code. Memory stays flat in the number of devices: accepted
ciphertexts are folded into one running sum and only their leaves are kept.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import tenseal as ts
from eth_utils import keccak

from truscl.errors import HeError, ProtocolError, SignatureError
from truscl.privacy.ckks import load_ciphertext
from truscl.wire import Domain, Update, blob_id, merkle_proof, merkle_root

log = logging.getLogger(__name__)


class RejectReason(enum.StrEnum):
    MALFORMED = "malformed"
    WRONG_TASK = "wrong-task"
    WRONG_ROUND = "wrong-round"
    CLOSED = "round-closed"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_DEVICE = "unknown-device"
    DUPLICATE = "duplicate"
    WRONG_CONTEXT = "wrong-context"
    BAD_CIPHERTEXT = "bad-ciphertext"


@dataclass(frozen=True)
class RoundTerms:
    task: bytes
    round: int
    context_hash: bytes
    n_params: int
    quorum: int
    expected: int  # devices enrolled in the task: the round closes early once all are in (0: never)
    deadline: float
    max_update_bytes: int


@dataclass(frozen=True)
class Accepted:
    update: Update
    blob_id: bytes
    leaf: bytes
    repeat: bool = False  # the same blob again (a device retrying): acknowledged, not re-added


@dataclass(frozen=True)
class Rejected:
    reason: RejectReason
    detail: str
    blob_id: bytes
    device: str | None = None  # the update's signer, when the update could be read
    round: int | None = None  # the round the update was made for, likewise


Decision = Accepted | Rejected


@dataclass(frozen=True)
class ClosedRound:
    round: int
    accepted: tuple[Accepted, ...]
    root: bytes
    aggregate: bytes
    aggregate_hash: bytes
    samples: int
    leaves: tuple[bytes, ...] = field(repr=False)

    def proof(self, leaf: bytes) -> list[bytes]:
        return merkle_proof(self.leaves, leaf)


class OpenRound:
    """One round between its announcement and its close."""

    def __init__(
        self,
        terms: RoundTerms,
        domain: Domain,
        context: ts.Context,
        is_registered: Callable[[str], bool],
    ) -> None:
        if context.is_private():
            raise HeError("the aggregator must not hold the HE secret key")
        self.terms = terms
        self.domain = domain
        self._context = context
        self._is_registered = is_registered
        self._accepted: dict[str, Accepted] = {}
        self._sum: ts.CKKSVector | None = None
        self._closed = False

    @property
    def participants(self) -> int:
        return len(self._accepted)

    def offer(self, blob: bytes) -> Decision:
        ident = blob_id(blob)
        try:
            update = Update.decode(blob, self.terms.max_update_bytes)
        except ProtocolError as exc:
            return Rejected(RejectReason.MALFORMED, str(exc), ident)
        device = update.device_address

        def reject(reason: RejectReason, detail: str) -> Rejected:
            return Rejected(reason, detail, ident, device, update.round)

        if self._closed:
            return reject(RejectReason.CLOSED, f"round {self.terms.round} is closed")
        if update.task != self.terms.task:
            return reject(RejectReason.WRONG_TASK, f"task {update.task.hex()}")
        if update.round != self.terms.round:
            return reject(
                RejectReason.WRONG_ROUND, f"round {update.round}, open is {self.terms.round}"
            )
        try:
            update.verify(self.domain)
        except SignatureError as exc:
            return reject(RejectReason.BAD_SIGNATURE, str(exc))
        if not self._is_registered(device):
            return reject(RejectReason.UNKNOWN_DEVICE, "not in the on-chain registry")
        previous = self._accepted.get(device)
        if previous is not None:
            if previous.blob_id == ident:
                return Accepted(previous.update, ident, previous.leaf, repeat=True)
            return reject(RejectReason.DUPLICATE, "a different update was already accepted")
        if update.context != self.terms.context_hash:
            return reject(RejectReason.WRONG_CONTEXT, f"context {update.context.hex()}")
        try:
            vector = load_ciphertext(self._context, update.ciphertext, self.terms.n_params)
        except HeError as exc:
            return reject(RejectReason.BAD_CIPHERTEXT, str(exc))
        if self._sum is None:
            self._sum = vector
        else:
            try:
                self._sum.add_(vector)  # in place: memory stays that of one ciphertext
            except (ValueError, RuntimeError) as exc:  # SEAL refuses what it cannot add
                return reject(RejectReason.BAD_CIPHERTEXT, f"cannot be added: {exc}")
        accepted = Accepted(update, ident, update.leaf())
        self._accepted[device] = accepted
        return accepted

    def ready(self, now: float) -> bool:
        """All enrolled devices are in, or the deadline passed with a quorum."""
        if self.terms.expected and self.participants >= self.terms.expected:
            return True
        return now >= self.terms.deadline and self.participants >= self.terms.quorum

    def close(self) -> ClosedRound:
        if self._sum is None:
            raise ProtocolError(f"round {self.terms.round} has no accepted update to close")
        self._closed = True
        accepted = tuple(sorted(self._accepted.values(), key=lambda a: a.leaf))
        leaves = tuple(a.leaf for a in accepted)
        aggregate = self._sum.serialize()
        return ClosedRound(
            round=self.terms.round,
            accepted=accepted,
            root=merkle_root(leaves),
            aggregate=aggregate,
            aggregate_hash=keccak(aggregate),
            samples=sum(a.update.samples for a in accepted),
            leaves=leaves,
        )
