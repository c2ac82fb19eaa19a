"""Split blobs into MQTT-sized chunks and put them back together.

A blob's id is its keccak-256, so reassembly proves integrity for free and a republished blob
(after a reconnect) is recognised as the same one. The reassembler bounds everything a sender
can make it hold: bytes per blob, blobs in flight per sender, and how long a partial blob waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eth_utils import keccak

from truscl.errors import ProtocolError
from truscl.wire import envelope
from truscl.wire.update import MAX_UPDATE_BYTES

DEFAULT_MAX_MESSAGE = 128 * 1024
MIN_MESSAGE = 1024  # senders may chunk smaller than a receiver's limit, but not below this
# Room for the CBOR map, its keys, the 32-byte id and the two counters.
CHUNK_OVERHEAD = 128


def blob_id(blob: bytes) -> bytes:
    return keccak(blob)


def split(blob: bytes, max_message: int = DEFAULT_MAX_MESSAGE) -> list[bytes]:
    """Encoded chunk messages, each at most ``max_message`` bytes."""
    if max_message < MIN_MESSAGE:
        raise ValueError(f"max_message must be at least {MIN_MESSAGE} bytes")
    room = max_message - CHUNK_OVERHEAD
    ident = blob_id(blob)
    pieces = [blob[i : i + room] for i in range(0, len(blob), room)] or [b""]
    return [
        envelope.encode("chunk", blob=ident, index=i, count=len(pieces), data=piece)
        for i, piece in enumerate(pieces)
    ]


@dataclass
class _Partial:
    count: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunks per sender until a blob is whole.

    ``add`` returns the blob when its last chunk arrives and ``None`` before; it raises
    :class:`ProtocolError` for a chunk that breaks a limit or a blob whose bytes do not hash
    to its id, and drops that blob's other pieces.
    """

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_blob: int = MAX_UPDATE_BYTES,  # the largest blob any role sends
        max_partial_per_sender: int = 4,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_message = max_message
        self.max_blob = max_blob
        self.max_partial_per_sender = max_partial_per_sender
        self.ttl = ttl
        self._clock = clock
        self._partial: dict[tuple[str, bytes], _Partial] = {}

    def add(self, sender: str, payload: bytes) -> bytes | None:
        chunk = envelope.decode(payload, "chunk", self.max_message)
        ident, index, count, data = chunk["blob"], chunk["index"], chunk["count"], chunk["data"]
        if len(ident) != 32:
            raise ProtocolError("chunk blob id must be 32 bytes")
        if count < 1 or index >= count:
            raise ProtocolError(f"chunk index {index} outside 0..{count - 1}")
        if count > self._max_chunks():
            raise ProtocolError(f"blob of {count} chunks exceeds {self.max_blob} bytes")
        self.expire()
        key = (sender, ident)
        partial = self._partial.get(key)
        if partial is None:
            in_flight = sum(1 for s, _ in self._partial if s == sender)
            if in_flight >= self.max_partial_per_sender:
                raise ProtocolError(f"{sender} has {in_flight} blobs in flight already")
            partial = self._partial[key] = _Partial(count=count, started=self._clock())
        if partial.count != count:
            del self._partial[key]
            raise ProtocolError("chunk count changed within one blob")
        if index not in partial.pieces:
            partial.pieces[index] = data
            partial.size += len(data)
        if partial.size > self.max_blob:
            del self._partial[key]
            raise ProtocolError(f"blob exceeds {self.max_blob} bytes")
        if len(partial.pieces) < count:
            return None
        del self._partial[key]
        blob = b"".join(partial.pieces[i] for i in range(count))
        if blob_id(blob) != ident:
            raise ProtocolError("reassembled blob does not match its id")
        return blob

    def expire(self) -> int:
        """Drop partial blobs older than the TTL; returns how many were dropped."""
        now = self._clock()
        stale = [k for k, p in self._partial.items() if now - p.started > self.ttl]
        for key in stale:
            del self._partial[key]
        return len(stale)

    @property
    def pending(self) -> int:
        return len(self._partial)

    def _max_chunks(self) -> int:
        """Chunks a legitimate blob can need: the sender may use messages as small as
        ``MIN_MESSAGE``. Bounding the count bounds what empty chunks could cost."""
        return -(-self.max_blob // (MIN_MESSAGE - CHUNK_OVERHEAD))
