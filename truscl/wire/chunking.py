"""Split blobs into MQTT-sized chunks and put them back together.

A blob's id is its keccak-256, so reassembly proves integrity for free and a republished blob
(after a reconnect) is recognised as the same one. A signed update travels under its own id
instead (:attr:`truscl.wire.update.Update.ident`, which commits to it without hashing its
ciphertext twice): its receiver reassembles it unchecked and checks the id once it has parsed
the update. The reassembler bounds everything a sender can make it hold: bytes per blob, blobs
in flight per sender, and how long a partial blob waits; and, because a client can publish
under as many sender topics as it likes, the bytes and the partial blobs held for all senders
together.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from truscl.errors import ProtocolError
from truscl.hashing import keccak
from truscl.wire import envelope
from truscl.wire.update import MAX_UPDATE_BYTES, Update

DEFAULT_MAX_MESSAGE = 128 * 1024
MIN_MESSAGE = 1024  # senders may chunk smaller than a receiver's limit, but not below this
# Room for the CBOR map, its keys, the 32-byte id and the two counters.
CHUNK_OVERHEAD = 128
# What one held piece costs beyond its data (dict slot, bytes object): counted against the
# total, so that a flood of empty chunks is not free.
PIECE_OVERHEAD = 128
DEFAULT_MAX_TOTAL = 64 * 1024 * 1024
DEFAULT_MAX_PARTIALS = 256


class ChunkRejected(ProtocolError):
    """A chunk broke a limit or a rule; ``reason`` is a short stable code to count it by."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def blob_id(blob: bytes) -> bytes:
    return keccak(blob)


def split(
    blob: bytes, max_message: int = DEFAULT_MAX_MESSAGE, ident: bytes | None = None
) -> list[bytes]:
    """Encoded chunk messages, each at most ``max_message`` bytes; ``ident``: the blob's id
    when it is not its keccak (a signed update's)."""
    if max_message < MIN_MESSAGE:
        raise ValueError(f"max_message must be at least {MIN_MESSAGE} bytes")
    room = max_message - CHUNK_OVERHEAD
    ident = blob_id(blob) if ident is None else ident
    pieces = [blob[i : i + room] for i in range(0, len(blob), room)] or [b""]
    return [
        envelope.encode("chunk", blob=ident, index=i, count=len(pieces), data=piece)
        for i, piece in enumerate(pieces)
    ]


def split_update(update: Update, max_message: int = DEFAULT_MAX_MESSAGE) -> list[bytes]:
    """A signed update's chunk messages, under its id."""
    return split(update.encode(), max_message, update.ident)


@dataclass
class _Partial:
    count: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0  # bytes of data
    cost: int = 0  # what it counts against the total: data and PIECE_OVERHEAD per piece


class Reassembler:
    """Collects chunks per sender until a blob is whole.

    ``add`` returns the blob when its last chunk arrives and ``None`` before; it raises
    :class:`ChunkRejected` for a chunk that breaks a limit or a blob whose bytes do not hash
    to its id, and drops that blob's other pieces. When the total limits are reached, a chunk
    that would start a new blob or grow one is refused (after stale blobs expire) rather than
    evicting another sender's blob: an attacker can delay honest senders by at most the TTL,
    never make the reassembler hold more.
    """

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_blob: int = MAX_UPDATE_BYTES,  # the largest blob any role sends
        max_partial_per_sender: int = 4,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_total: int = DEFAULT_MAX_TOTAL,
        max_partials: int = DEFAULT_MAX_PARTIALS,
    ) -> None:
        self.max_message = max_message
        self.max_blob = max_blob
        self.max_partial_per_sender = max_partial_per_sender
        self.ttl = ttl
        self.max_total = max_total
        self.max_partials = max_partials
        self._clock = clock
        # In the order they started, which (the clock being monotonic) is the order they
        # expire in: expiring looks at the stale ones and one more, not at every blob held.
        self._partial: dict[tuple[str, bytes], _Partial] = {}
        self._per_sender: Counter[str] = Counter()  # partial blobs in flight, by sender
        self._held = 0  # bytes held for all senders, PIECE_OVERHEAD included

    def add(self, sender: str, payload: bytes) -> bytes | None:
        whole = self.add_with_id(sender, payload)
        return None if whole is None else whole[1]

    def add_with_id(
        self, sender: str, payload: bytes, check: bool = True
    ) -> tuple[bytes, bytes] | None:
        """As ``add``, with the blob's id (checked): a receiver that names or archives the blob
        by it need not hash it again. With ``check`` false the caller checks the id itself (a
        signed update's, from its parse: see the module's docstring)."""
        try:
            chunk = envelope.decode(payload, "chunk", self.max_message)
        except ProtocolError as exc:
            raise ChunkRejected("chunk-malformed", str(exc)) from None
        ident, index, count, data = chunk["blob"], chunk["index"], chunk["count"], chunk["data"]
        if len(ident) != 32:
            raise ChunkRejected("chunk-malformed", "chunk blob id must be 32 bytes")
        if count < 1 or index >= count:
            raise ChunkRejected("chunk-malformed", f"chunk index {index} outside 0..{count - 1}")
        if count > self._max_chunks():
            raise ChunkRejected("blob-too-large", f"blob of {count} chunks exceeds {self.max_blob}")
        self.expire()
        key = (sender, ident)
        partial = self._partial.get(key)
        if partial is None:
            in_flight = self._per_sender[sender]
            if in_flight >= self.max_partial_per_sender:
                raise ChunkRejected("sender-limit", f"{sender} has {in_flight} blobs in flight")
            if len(self._partial) >= self.max_partials:
                raise ChunkRejected("reassembly-full", f"{len(self._partial)} blobs in flight")
            partial = self._partial[key] = _Partial(count=count, started=self._clock())
            self._per_sender[sender] += 1
        if partial.count != count:
            self._drop(key)
            raise ChunkRejected("chunk-malformed", "chunk count changed within one blob")
        if index not in partial.pieces:
            cost = len(data) + PIECE_OVERHEAD
            if partial.size + len(data) > self.max_blob:
                self._drop(key)
                raise ChunkRejected("blob-too-large", f"blob exceeds {self.max_blob} bytes")
            if self._held + cost > self.max_total:
                if not partial.pieces:
                    self._drop(key)
                raise ChunkRejected("reassembly-full", f"{self._held} bytes held for all senders")
            partial.pieces[index] = data
            partial.size += len(data)
            partial.cost += cost
            self._held += cost
        if len(partial.pieces) < count:
            return None
        self._drop(key)
        blob = b"".join(partial.pieces[i] for i in range(count))
        if check and blob_id(blob) != ident:
            raise ChunkRejected("blob-mismatch", "reassembled blob does not match its id")
        return ident, blob

    def expire(self) -> int:
        """Drop partial blobs older than the TTL; returns how many were dropped."""
        now = self._clock()
        stale = []
        for key, partial in self._partial.items():  # oldest first: stop at the first fresh one
            if now - partial.started <= self.ttl:
                break
            stale.append(key)
        for key in stale:
            self._drop(key)
        return len(stale)

    @property
    def pending(self) -> int:
        return len(self._partial)

    @property
    def held_bytes(self) -> int:
        """Bytes held in partial blobs for all senders (what ``max_total`` bounds)."""
        return self._held

    def _drop(self, key: tuple[str, bytes]) -> None:
        self._held -= self._partial.pop(key).cost
        sender = key[0]
        self._per_sender[sender] -= 1
        if not self._per_sender[sender]:
            del self._per_sender[sender]  # a sender that comes once costs nothing after

    def _max_chunks(self) -> int:
        """Chunks a legitimate blob can need: the sender may use messages as small as
        ``MIN_MESSAGE``. Bounding the count bounds what empty chunks could cost."""
        return -(-self.max_blob // (MIN_MESSAGE - CHUNK_OVERHEAD))
