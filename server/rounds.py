"""The aggregator's round logic, free of I/O.

``OpenRound.offer`` takes the bytes of one reassembled update and returns a decision;
``close`` returns what gets archived, anchored and sent on. MQTT, the archive and the chain
are adapters around it (see :mod:`server.aggregator`), so tests, the simulator and a
deployment run exactly this code. Memory stays flat in the number of devices: accepted
ciphertexts are folded into one running sum and only their leaves are kept.

Several shards may share a round's updates (an MQTT 5 shared subscription splits them): each
keeps an ``OpenRound`` of its own, asking the others' decisions through ``counted_elsewhere``,
and ``merge`` makes one closed round of their ``PartialRound``s. CKKS addition is exact modular
arithmetic and the leaves are sorted, so the root and the aggregate's hash are those one
aggregator would have made of the same updates.

Late updates: under the task term ``late_updates``, an update made for round r that arrives
while r+1 is open is counted in r+1 (its signed fields still say r, and the leaf commits to
them), unless r counted an update of that device made for r already. Each update is counted
once: a round holds at most one update per device and per round it was made for.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

import cbor2
import numpy as np
import tenseal as ts

from truscl.errors import HeError, ProtocolError, SignatureError
from truscl.hashing import keccak
from truscl.privacy.ckks import VectorFormat, VectorSum, sum_ciphertexts
from truscl.wire import Domain, Update, UpdateRecord, blob_id, envelope, merkle_root
from truscl.wire.merkle import merkle_proofs

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
    expected: int  # devices enrolled in the task: the round closes early once all are in
    deadline: float
    max_update_bytes: int
    late_updates: bool = False  # count updates made for the previous round (task term)
    # When ``expected`` is 0, the devices that contributed to the previous round: the round
    # closes early once each has sent an update made for it (none known: at the deadline).
    active: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Parsed:
    """What an update blob says of itself, learnt without its round: its fields, or why they
    cannot be read, whether its signature is the claimed device's and, given the task's
    ``vectors``, its ciphertext's checked residues or why it has none. Hashing the ciphertext
    and recovering the signer are most of an update's cost and release the GIL, so the
    aggregator learns this on a thread of its own while its worker thread decides and adds."""

    update: Update | None
    malformed: str = ""  # why the blob is not an update, when ``update`` is None
    bad_signature: str = ""  # why the signature is not the claimed device's, when it is not
    vectors: VectorFormat | None = None  # the format the ciphertext was checked against
    residues: np.ndarray | None = field(default=None, repr=False, compare=False)
    bad_ciphertext: str = ""  # why the ciphertext is not one of ``vectors``, when it is not

    @classmethod
    def of(
        cls, blob: bytes, domain: Domain, max_bytes: int, vectors: VectorFormat | None = None
    ) -> Parsed:
        try:
            update = Update.decode(blob, max_bytes)
        except ProtocolError as exc:
            return cls(None, malformed=str(exc))
        return cls.of_update(update, domain, vectors)

    @classmethod
    def of_update(
        cls, update: Update, domain: Domain, vectors: VectorFormat | None = None
    ) -> Parsed:
        """As :meth:`of`, for an update decoded already (one read back from the archive)."""
        try:
            update.verify(domain)
        except SignatureError as exc:
            return cls(update, bad_signature=str(exc))
        if vectors is None:
            return cls(update)
        try:
            return cls(update, vectors=vectors, residues=vectors.residues(update.ciphertext))
        except HeError as exc:
            return cls(update, vectors=vectors, bad_ciphertext=str(exc))


@dataclass(frozen=True)
class Accepted:
    update: UpdateRecord  # the signed fields, the ciphertext by its hash: no ciphertext is kept
    blob_id: bytes
    leaf: bytes
    counted_in: int  # the round whose aggregate counts it: its own, or the next one if late
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
        try:
            return self._proofs[leaf]
        except KeyError:
            raise ProtocolError("leaf is not in the tree") from None

    @functools.cached_property
    def _proofs(self) -> dict[bytes, list[bytes]]:
        return merkle_proofs(self.leaves)


@dataclass(frozen=True)
class PartialRound:
    """What one shard counted of a round: its accepted updates and their sum (serialised;
    empty if it counted none)."""

    round: int
    accepted: tuple[Accepted, ...]
    aggregate: bytes

    def encode(self) -> bytes:
        """For the journal, where a shard hands it to shard 0: the records, not the updates."""
        return cbor2.dumps(
            {
                "v": envelope.VERSION,
                "round": self.round,
                "aggregate": self.aggregate,
                "accepted": [[a.blob_id, a.leaf, a.counted_in, *a.update] for a in self.accepted],
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> PartialRound:
        """``ProtocolError`` if it is not a partial, or a leaf is not its record's."""
        try:
            fields = cbor2.loads(data)
            if fields["v"] != envelope.VERSION:
                raise ProtocolError(f"partial of envelope version {fields['v']}")
            accepted = tuple(
                Accepted(UpdateRecord(*row[3:]), row[0], row[1], row[2])
                for row in fields["accepted"]
            )
            partial = cls(fields["round"], accepted, fields["aggregate"])
        except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"unreadable partial round: {exc}") from exc
        if any(a.update.leaf() != a.leaf for a in accepted):
            raise ProtocolError(f"partial of round {partial.round}: a leaf is not its record's")
        return partial


def merge(partials: Sequence[PartialRound], context: ts.Context, n_params: int) -> ClosedRound:
    """One closed round from the partials of shards that shared its updates; ``ProtocolError``
    if they are of different rounds, none counted anything or an update (or a device's update
    for one round) is counted twice, ``HeError`` if a partial sum is not a ciphertext of the
    task."""
    if len({p.round for p in partials}) != 1:
        raise ProtocolError(
            f"cannot merge partials of rounds {sorted({p.round for p in partials})}"
        )
    accepted = tuple(sorted((a for p in partials for a in p.accepted), key=lambda a: a.leaf))
    if not accepted:
        raise ProtocolError(f"round {partials[0].round} has no accepted update to close")
    counted = {(a.update.device, a.update.round) for a in accepted}
    if len(counted) != len(accepted) or len({a.blob_id for a in accepted}) != len(accepted):
        raise ProtocolError("an update is counted in two partials")
    sums = [p.aggregate for p in partials if p.accepted]
    aggregate = sum_ciphertexts(context, sums, n_params)
    leaves = tuple(a.leaf for a in accepted)
    return ClosedRound(
        round=partials[0].round,
        accepted=accepted,
        root=merkle_root(leaves),
        aggregate=aggregate,
        aggregate_hash=keccak(aggregate),
        samples=sum(a.update.samples for a in accepted),
        leaves=leaves,
    )


class OpenRound:
    """One round between its announcement and its close.

    ``previous`` maps each device to the update made for the round before this one that the
    previous round counted (by blob id): a late update is counted only if there is none.
    ``counted_elsewhere(device, made_for)``: the blob id of such an update that another shard
    counted in this round, if any.
    """

    def __init__(
        self,
        terms: RoundTerms,
        domain: Domain,
        context: ts.Context,
        is_registered: Callable[[str], bool],
        previous: Mapping[str, bytes] | None = None,
        counted_elsewhere: Callable[[str, int], bytes | None] | None = None,
    ) -> None:
        if context.is_private():
            raise HeError("the aggregator must not hold the HE secret key")
        self.terms = terms
        self.domain = domain
        self._context = context
        self._is_registered = is_registered
        self._previous = dict(previous or {})
        self._counted_elsewhere = counted_elsewhere
        self._accepted: dict[tuple[str, int], Accepted] = {}  # by (device, round made for)
        self._in: set[str] = set()  # devices whose update made for this round is counted
        self.vectors = VectorFormat.of(context, terms.n_params)
        self._sum = VectorSum(self.vectors)
        self._closed = False

    @property
    def participants(self) -> int:
        """Updates counted so far, late ones included."""
        return len(self._accepted)

    @property
    def devices_in(self) -> frozenset[str]:
        """Devices that sent an update made for this round."""
        return frozenset(self._in)

    def offer(
        self,
        blob: bytes,
        *,
        ident: bytes | None = None,
        journaled: bool = False,
        parsed: Parsed | None = None,
    ) -> Decision:
        """Decide on one update. ``ident``: the id it arrived under, which the caller checked
        against the update (:attr:`Update.ident`); a blob that is not an update is rejected
        under it, or else under its keccak. ``journaled``: it was accepted before a restart,
        when the registry was asked; it is not asked again (the node may be away while the
        aggregator rebuilds its round). ``parsed``: :meth:`Parsed.of` the blob, when the
        caller made it already. ``ChainError`` from the registry leaves the round unchanged."""
        if parsed is None:
            parsed = Parsed.of(blob, self.domain, self.terms.max_update_bytes)
        update = parsed.update
        if update is None:
            return Rejected(RejectReason.MALFORMED, parsed.malformed, ident or blob_id(blob))
        ident = update.ident
        device = update.device_address
        current = self.terms.round

        def reject(reason: RejectReason, detail: str) -> Rejected:
            return Rejected(reason, detail, ident, device, update.round)

        if self._closed:
            return reject(RejectReason.CLOSED, f"round {current} is closed")
        if update.task != self.terms.task:
            return reject(RejectReason.WRONG_TASK, f"task {update.task.hex()}")
        late = update.round == current - 1 and self.terms.late_updates
        if update.round > current:
            return reject(RejectReason.WRONG_ROUND, f"round {update.round}, open is {current}")
        if update.round < current and not late:
            return reject(RejectReason.CLOSED, f"round {update.round} is closed, open is {current}")
        if parsed.bad_signature:
            return reject(RejectReason.BAD_SIGNATURE, parsed.bad_signature)
        if not journaled and not self._is_registered(device):
            return reject(RejectReason.UNKNOWN_DEVICE, "not in the on-chain registry")
        if late and device in self._previous:
            if self._previous[device] == ident:  # a retry of an update round r-1 counted
                return Accepted(update.record(), ident, update.leaf(), current - 1, repeat=True)
            return reject(
                RejectReason.DUPLICATE, f"round {update.round} counted another update of it"
            )
        previous = self._accepted.get((device, update.round))
        if previous is not None:
            if previous.blob_id == ident:
                return replace(previous, repeat=True)
            return reject(RejectReason.DUPLICATE, "a different update was already accepted")
        elsewhere = None
        if self._counted_elsewhere is not None and not journaled:
            elsewhere = self._counted_elsewhere(device, update.round)
        if elsewhere == ident:  # a retry of an update another shard counted
            return Accepted(update.record(), ident, update.leaf(), current, repeat=True)
        if elsewhere is not None:
            return reject(RejectReason.DUPLICATE, "a different update was already accepted")
        if update.context != self.terms.context_hash:
            return reject(RejectReason.WRONG_CONTEXT, f"context {update.context.hex()}")
        residues, bad = parsed.residues, parsed.bad_ciphertext
        if parsed.vectors != self.vectors:  # parsed without the task's format, or another's
            try:
                residues, bad = self.vectors.residues(update.ciphertext), ""
            except HeError as exc:
                residues, bad = None, str(exc)
        if residues is None:
            return reject(RejectReason.BAD_CIPHERTEXT, bad)
        self._sum.add(residues)  # in place: memory stays that of one vector
        accepted = Accepted(update.record(), ident, update.leaf(), current)
        self._accepted[(device, update.round)] = accepted
        if update.round == current:
            self._in.add(device)
        return accepted

    def ready(self, now: float, tally: tuple[int, AbstractSet[str]] | None = None) -> bool:
        """Every active device is in (the enrolled count, or else every device of the previous
        round), or the deadline passed with a quorum. ``tally``: the updates counted and the
        devices in, over every shard, when this round is one shard's."""
        participants, devices_in = tally if tally is not None else (self.participants, self._in)
        if self.terms.expected and len(devices_in) >= self.terms.expected:
            return True
        if not self.terms.expected and self.terms.active and self.terms.active <= devices_in:
            return True
        return now >= self.terms.deadline and participants >= self.terms.quorum

    def partial(self) -> PartialRound:
        """What this round has counted, to be merged with other shards' (see ``merge``)."""
        aggregate = self._sum.serialize() if self._accepted else b""
        return PartialRound(self.terms.round, tuple(self._accepted.values()), aggregate)

    def close(self) -> ClosedRound:
        """The round as one aggregator saw it: the merge of its one partial."""
        partial = self.partial()
        self._closed = True
        return merge([partial], self._context, self.terms.n_params)
