"""The aggregator service: MQTT, archive, journal and chain wrapped around :mod:`server.rounds`.

Messages arrive on paho's network thread and are queued; one worker thread does the work in
order, so the round state needs no locks. An accepted update is archived (fsynced) and journaled
before its receipt is sent, in groups: the updates accepted while more are queued (up to
``BATCH_UPDATES`` or ``BATCH_BYTES``) share one archive commit and one journal transaction, and
their receipts go out after both, so an fsync of a few milliseconds is paid per group, not per
update, and a receipt still never precedes durability. A closed round is journaled before it
is anchored, anchored before its aggregate goes to the owner, and anchoring checks the chain
first, so neither a retry nor a restart anchors a round twice, loses an accepted update or
counts one twice (see :mod:`server.journal`).

One task's aggregator may run as several shards, one process each (``Shard``): they take the
task's updates from one MQTT 5 shared subscription, so the broker hands each whole update to one
of them, and they share the archive and the journal. The journal is their one decision point
(see :mod:`server.journal`): a shard asks it whether another shard counted a device's update
already, and its constraints refuse the commit of a shard that raced another. Shard 0 alone
opens, closes, anchors and delivers rounds; it closes one by marking it closing in the journal,
the other shards hand in their partial sums there, and shard 0 merges them
(:func:`server.rounds.merge`: the root and the aggregate's hash one aggregator would have made).
A shard takes whole updates only: a task whose updates travel in several chunks cannot be
sharded (mosquitto would hand the chunks of one update to different shards).

An unreachable node is a reason to wait, never to refuse: updates that need the registry wait
(bounded) until it answers, and closed rounds are anchored and delivered with exponential
backoff and full jitter. Every refused message and chunk is logged and counted by reason in
``rejections``.
"""

from __future__ import annotations

import logging
import queue
import random
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from eth_utils import is_address

from truscl import metrics
from truscl.chain import ChainClient
from truscl.errors import ChainError, ConfigError, ProtocolError, TrusclError
from truscl.hashing import keccak
from truscl.mqtt import BrokerSettings, MqttLink, delivery
from truscl.privacy.ckks import VectorFormat, aggregator_context_bytes, load_context
from truscl.server.archive import Archive, RoundManifest
from truscl.server.journal import Journal, JournaledAcceptance, JournaledRound
from truscl.server.registry import RegistryCache
from truscl.server.rounds import (
    Accepted,
    ClosedRound,
    OpenRound,
    Parsed,
    PartialRound,
    Rejected,
    RejectReason,
    RoundTerms,
    merge,
)
from truscl.systemd import Heartbeat, worker_items
from truscl.task import MAX_MESSAGE_LIMIT, SPEC_MAX_BYTES, TaskSpec
from truscl.wire import Domain, Reassembler, TaskTopics, envelope
from truscl.wire.chunking import CHUNK_OVERHEAD, ChunkRejected, split
from truscl.wire.receipt import Receipt
from truscl.wire.update import MAX_UPDATE_BYTES

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5  # first retry of a chain or broker step waits up to this long
RETRY_CAP_S = 30.0  # and no retry waits longer
REPEAT_BASE_S = 10.0  # an aggregate without its model yet is sent again after up to this
REPEAT_CAP_S = 120.0
TERMS_PATIENCE_S = 30.0  # how often a service still waiting for its task's terms says so
# Updates that wait for the registry (node away) or for the next round (late ones): bounded,
# so a node outage cannot grow memory without end. What does not fit gets no receipt and is
# sent again by its device.
HELD_MAX_BYTES = 32 * 1024 * 1024
# Bytes of partial blobs held for all senders together (a Pi has little memory to spare).
REASSEMBLY_MAX_BYTES = 64 * 1024 * 1024
# Group commit: accepted updates made durable together, at most this many or this many bytes
# (held until their blobs are written; bounded so memory stays flat in the number of devices).
BATCH_UPDATES = 64
BATCH_BYTES = 4 * 1024 * 1024
# Message bytes queued for the worker: beyond this, paho's network thread waits, the socket is
# not read, and the broker keeps the rest in this session's queue (max_queued_messages), so a
# burst from a thousand devices costs the broker memory, not the aggregator's. (With 8 MiB
# here and 16 updates parsed ahead, peak RSS grew 10-11 % from 10 to 100 devices; with these
# bounds 4-5 %, at the same rate: bench/aggregator.py.)
INBOX_MAX_BYTES = 4 * 1024 * 1024
# Whole updates are parsed (the ciphertext's one hash, signature recovery: hashing and coincurve
# release the GIL; the ciphertext's residues read and checked) on this many threads while the
# worker decides, adds and commits, at most PARSE_AHEAD of them at a time (bounded memory: each
# is at most MAX_UPDATE_BYTES). One thread overlaps enough: a second one only contends with the
# worker for the GIL (1,000 updates in process, 5 interleaved pairs: 884-932 /s with one against
# 807-893 with two: bench/aggregator.py).
PARSE_THREADS = 1
PARSE_AHEAD = 8
# How often shard 0 of a sharded aggregator reads the round's tally of every shard from the
# journal (a query over its rows): it paces the early close, it decides nothing.
TALLY_EVERY_S = 0.1
# What an update's CBOR holds beyond its ciphertext (its other fields and their keys) at most.
UPDATE_FIELDS_BYTES = 1024


class DeliveryPending(TrusclError, RuntimeError):
    """A round's aggregate and proofs are not acknowledged by the broker yet."""


class DeliveryFailed(TrusclError, ConnectionError):
    """Some of a round's results did not reach the broker: they are published again."""


class StorageFailed(TrusclError, OSError):
    """Accepted updates could not be archived or journaled: they get no receipt."""


class Inbox:
    """The worker's queue of (topic, payload), holding at most ``max_bytes`` of payloads: a
    ``put`` beyond that waits until the worker has taken enough (one message larger than the
    whole bound still gets in, alone). Items without payload (markers, ``None``) never wait.
    Once closed (the worker has stopped), nothing waits and nothing more is kept: a sender
    blocked on a full inbox would otherwise hold paho's network thread, and the link's close
    with it. What is dropped got no receipt, so its device sends it again."""

    def __init__(self, max_bytes: int) -> None:
        self._items: deque[tuple[str, bytes] | None] = deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._changed = threading.Condition()
        self._closed = False

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._items = deque(item for item in self._items if item is None)  # the stop marker
            self._bytes = 0
            self._changed.notify_all()

    def put(self, item: tuple[str, bytes] | None) -> None:
        size = len(item[1]) if item is not None else 0
        with self._changed:
            while size and self._bytes and self._bytes + size > self._max_bytes:
                if self._closed:
                    return
                self._changed.wait()
            if self._closed:
                return
            self._items.append(item)
            self._bytes += size
            self._changed.notify_all()

    def get(self, timeout: float) -> tuple[str, bytes] | None:
        """The oldest item; ``queue.Empty`` if none came within ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            item = self._items.popleft()
            self._bytes -= len(item[1]) if item is not None else 0
            self._changed.notify_all()
            return item

    def empty(self) -> bool:
        with self._changed:
            return not self._items


@dataclass
class RoundStats:
    """What the aggregator saw of one round, for reports and the demo."""

    round: int
    participants: int = 0
    rejected: int = 0
    bytes_in: int = 0
    epsilon: float = 0.0  # the most any accepted device says it has spent, this round included
    anchor_tx: str = ""
    closed_at: float = 0.0
    rejections: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Shard:
    """Which of a task's ``count`` aggregator processes this is; shard 0 leads."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index} of {self.count} does not exist")

    @property
    def leads(self) -> bool:
        return self.index == 0

    @property
    def shared(self) -> bool:
        return self.count > 1

    def owns(self, counted_by: int) -> bool:
        """Whether this shard rebuilds an update that ``counted_by`` counted: its own, and, for
        shard 0, those of shards that no longer run (the task now has fewer)."""
        return counted_by == self.index or (self.leads and counted_by >= self.count)


@dataclass
class Backoff:
    """Exponential backoff with full jitter: after the n-th failure in a row, wait a uniformly
    random time in [0, min(cap, base * 2^(n-1))], so that services retrying one node spread out
    rather than hit it in step. On the monotonic clock: it paces load, it decides nothing."""

    rng: random.Random
    base: float = RETRY_BASE_S
    cap: float = RETRY_CAP_S
    failures: int = 0
    due: float = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self.due

    def failed(self) -> float:
        self.failures += 1
        delay = self.rng.uniform(0, min(self.cap, self.base * 2 ** (self.failures - 1)))
        self.due = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.failures, self.due = 0, 0.0


class Aggregator:
    """The aggregator of one task.

    Its terms (spec and public HE context) are given, or read from the archive, or taken from
    the task's retained MQTT topics; whichever way, they are checked against the hashes the
    owner anchored on chain before any update is looked at. Its journal lives next to the
    archive unless ``journal`` names another file.
    """

    def __init__(
        self,
        *,
        chain: ChainClient,
        archive: Archive,
        broker: BrokerSettings,
        expected: int,
        task: str | None = None,
        spec: TaskSpec | None = None,
        public_context: bytes | None = None,
        journal: Path | None = None,
        clock: Callable[[], float] = time.time,
        on_closed: Callable[[RoundStats], None] | None = None,
        on_accepted: Callable[[int, int], None] | None = None,
        heartbeat: Heartbeat | None = None,
        rng: random.Random | None = None,
        registry: RegistryCache | None = None,
        shard: Shard | None = None,
    ) -> None:
        task = task or (spec.task if spec is not None else None)
        if task is None:
            raise ProtocolError("an aggregator serves one task: give its id or its spec")
        self.task = task.lower()
        self.topics = TaskTopics(self.task)
        self.chain = chain
        self.archive = archive
        self.expected = expected
        self.shard = shard or Shard()
        self.stats: dict[int, RoundStats] = {}
        self.rejections: Counter[str] = Counter()  # refused messages and chunks, by reason
        self.spec: TaskSpec  # set by _adopt, before any update is looked at
        self._journal_path = journal or archive.root / "journal" / f"{self.task}.sqlite"
        self._journal: Journal
        self._clock = clock
        self._on_closed = on_closed
        self._on_accepted = on_accepted
        self._heartbeat = heartbeat
        self._terms_warned_at = clock()
        self._domain = Domain(chain.chain_id, chain.address)
        self._registry = registry if registry is not None else RegistryCache(chain)
        rng = rng or random.Random()
        self._open: OpenRound | None = None
        self._merging: OpenRound | None = None  # shard 0: closing, waiting for partials
        self._tallied_at = 0.0
        self._closing: deque[ClosedRound] = deque()  # closed, not yet delivered: oldest first
        self._closing_retry = Backoff(rng)
        self._deliveries: dict[int, list[paho.MQTTMessageInfo]] = {}
        self._held: deque[tuple[str, bytes, bytes]] = deque()  # sender, blob id, blob
        # Whole updates being parsed, in arrival order: sender, blob id, blob, the parse.
        self._parsing: deque[tuple[str, bytes, bytes, Future[Parsed | ChunkRejected]]] = deque()
        self._parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="aggregator-parse")
        self._staged: list[Accepted] = []  # accepted, being archived: durable at _commit
        self._staged_bytes = 0
        self._due: list[Accepted] = []  # receipts to send at _commit (repeats too)
        self._held_bytes = 0
        self._held_retry = Backoff(rng)
        self._model_retry = Backoff(rng)
        # The last delivered aggregate, sent again (with backoff) until its round's model comes:
        # a key holder that was not connected when it went out would otherwise never see it.
        self._repeat: tuple[int, list[bytes]] | None = None
        self._repeat_retry = Backoff(rng, base=REPEAT_BASE_S, cap=REPEAT_CAP_S)
        self._last_closed = 0
        self._deadline_logged = False
        self._announcement: bytes | None = None  # the open round's, to publish again
        self._terms_ready = threading.Event()
        self._retained_spec: TaskSpec | None = None
        self._context_chunks = Reassembler(max_message=MAX_MESSAGE_LIMIT)
        self._retained_context: bytes | None = None
        self._stashed_model: bytes | None = None
        self._inbox = Inbox(INBOX_MAX_BYTES)
        self._worker = threading.Thread(target=self._run, name="aggregator", daemon=True)
        updates, other = self.topics.all_updates, self.topics.shared_updates
        if self.shard.shared:
            updates, other = other, updates
        terms = [self.topics.model, self.topics.spec, f"{self.topics.context}/+"]
        self._link = MqttLink(
            f"truscl-aggregator-{self.task[2:10]}"
            + (f"-{self.shard.index}" if self.shard.index else ""),
            broker,
            on_message=self.receive,
            on_connected=lambda: self._inbox.put((_CONNECTED, b"")),
            subscriptions=[updates, *(terms if self.shard.leads else [])],
            unsubscriptions=[other],  # a session of a run with another number of workers
        )
        if spec is not None and public_context is not None:
            if keccak(public_context).hex() != spec.context_hash.removeprefix("0x"):
                raise ProtocolError("public context does not match the task's context hash")
            self._adopt(spec, public_context)
        else:
            self._adopt_archived()
        if not self.shard.leads and not self.has_terms:
            raise ConfigError(
                f"shard {self.shard.index} takes the task's terms from the archive, which has "
                "none the chain vouches for yet: start shard 0 first"
            )

    @property
    def has_terms(self) -> bool:
        return self._terms_ready.is_set()

    def wait_for_terms(self, timeout: float | None = None) -> bool:
        """Whether the task's spec and context are known (they may come from the broker)."""
        return self._terms_ready.wait(timeout)

    def _adopt(self, spec: TaskSpec, public_context: bytes) -> None:
        self.spec = spec
        self._context = load_context(aggregator_context_bytes(public_context))  # no key at all
        self._vectors = VectorFormat.of(self._context, spec.n_params)
        self._reassembler = Reassembler(
            max_message=spec.max_message, max_blob=MAX_UPDATE_BYTES, max_total=REASSEMBLY_MAX_BYTES
        )
        self._link.max_message = spec.max_message
        whole = self._vectors.max_bytes + UPDATE_FIELDS_BYTES + CHUNK_OVERHEAD
        if self.shard.shared and spec.max_message < whole:
            raise ConfigError(
                f"a sharded aggregator takes whole updates, but task {spec.task} sends its "
                f"updates of up to {whole} bytes in messages of {spec.max_message}: run one "
                "shard, or give the task a max_message of at least that"
            )
        self.archive.put_task(spec.task, spec.encode(), public_context)
        self._journal = Journal(self._journal_path, spec.task)
        self._recover()
        self._terms_ready.set()
        log.info("aggregator: serving task %s", spec.task)

    def _adopt_archived(self) -> None:
        """Terms kept by an earlier run, if the chain still vouches for them."""
        try:
            spec_bytes, context = self.archive.spec(self.task), self.archive.context(self.task)
        except (OSError, ProtocolError):
            return
        record = self.chain.task(bytes.fromhex(self.task[2:]))
        if keccak(spec_bytes) == record.spec_hash and keccak(context) == record.context_hash:
            self._adopt(TaskSpec.decode(spec_bytes), context)

    def _recover(self) -> None:
        """Rebuild what the journal says was under way: the rounds closed but not delivered
        (queued to be anchored and delivered) and the open round, each from its journaled
        updates as archived, in the order they were accepted (of the open round, those this
        shard counted). A shard other than shard 0 takes up only the open round."""
        if not self.shard.leads:
            self._follow()
            return
        for journaled in self._journal.rounds("closed", "anchored"):
            closed = self._rebuild(journaled).close()
            self._closing.append(closed)
            self._last_closed = journaled.round
            log.info("aggregator: round %d closed before a restart; finishing it", closed.round)
        delivered = self._journal.rounds("delivered")
        if delivered:
            self._last_closed = max(self._last_closed, delivered[-1].round)
        for journaled in self._journal.rounds("open"):
            round_ = self._rebuild(journaled, self.shard.owns)
            log.info(
                "aggregator: round %d resumed with %d updates, open until %.0f",
                journaled.round,
                round_.participants,
                journaled.deadline,
            )
            if self._journal.is_closing(journaled.round):
                self._start_merge(round_)  # merged on a tick, once every shard handed in
                continue
            self._open = round_
            self._announcement = _announcement(
                journaled.round, journaled.model_hash, journaled.deadline
            )

    def _rebuild(
        self, journaled: JournaledRound, counted_by: Callable[[int], bool] = lambda _: True
    ) -> OpenRound:
        """``journaled`` from its updates as archived: those of the shards ``counted_by``
        names (every shard's, of a round that closed)."""
        round_ = self._new_round(journaled.round, journaled.deadline)
        stats = self.stats[journaled.round]
        for entry in self._journal.updates(journaled.round):
            if not counted_by(entry.shard):
                continue
            blob, update = self.archive.update(entry.blob)  # checked against its name
            parsed = Parsed.of_update(update, self._domain, self._vectors)
            decision = round_.offer(blob, journaled=True, parsed=parsed)
            if not isinstance(decision, Accepted) or decision.repeat:
                raise ProtocolError(
                    f"journaled update {entry.blob[:12]} of round {journaled.round} "
                    f"is not accepted again: {decision}"
                )
            stats.participants += 1
            stats.epsilon = max(stats.epsilon, decision.update.epsilon)
        return round_

    def _new_round(self, round_no: int, deadline: float) -> OpenRound:
        """Round ``round_no`` under the task's terms, knowing what the round before counted."""
        before = self._journal.updates(round_no - 1)
        terms = RoundTerms(
            task=self.spec.task_id,
            round=round_no,
            context_hash=bytes.fromhex(self.spec.context_hash[2:]),
            n_params=self.spec.n_params,
            quorum=self.spec.quorum,
            expected=self.expected,
            deadline=deadline,
            max_update_bytes=MAX_UPDATE_BYTES,
            late_updates=self.spec.late_updates,
            active=frozenset(u.device for u in before),
        )
        previous = {u.device: bytes.fromhex(u.blob) for u in before if u.made_for == round_no - 1}
        self.stats[round_no] = RoundStats(round_no)
        self._deadline_logged = False

        def counted_elsewhere(device: str, made_for: int) -> bytes | None:
            blob = self._journal.counted(round_no, device, made_for)
            return None if blob is None else bytes.fromhex(blob)

        return OpenRound(
            terms,
            self._domain,
            self._context,
            self._registry.known,
            previous,
            counted_elsewhere if self.shard.shared else None,
        )

    def _on_terms(self, topic: str, payload: bytes) -> None:
        """A retained spec or context chunk, before the terms are known: checked like a device
        checks them, against the hashes on chain."""
        record = self.chain.task(bytes.fromhex(self.task[2:]))
        if topic == self.topics.spec:
            spec = TaskSpec.from_dict(envelope.decode(payload, "spec", SPEC_MAX_BYTES)["spec"])
            if spec.hash() != record.spec_hash:
                raise ProtocolError("task spec does not match its on-chain hash")
            self._retained_spec = spec
        else:
            blob = self._context_chunks.add("owner", payload)
            if blob is None:
                return
            if keccak(blob) != record.context_hash:
                raise ProtocolError("HE context does not match its on-chain hash")
            self._retained_context = blob
        if self._retained_spec is not None and self._retained_context is not None:
            self._adopt(self._retained_spec, self._retained_context)

    def receive(self, topic: str, payload: bytes) -> None:
        """One MQTT message, for the worker thread (paho's network thread calls this)."""
        self._inbox.put((topic, payload))

    def start(self) -> Aggregator:
        self._worker.start()
        self._link.start()
        return self

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self) -> None:
        self._inbox.put(None)
        if self._worker.is_alive():
            self._worker.join(10)
        self._parser.shutdown(cancel_futures=True)
        self._inbox.close()
        self._link.close()
        if self.has_terms:
            self._journal.close()

    # -- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        for topic, payload in worker_items(self._inbox.get, self._heartbeat, 0.1, ("", b"")):
            try:
                self._dispatch(topic, payload)
                self._settle(every=self._inbox.empty())
                if self.has_terms:
                    self._tick()
                if self._inbox.empty() or self._batch_full():
                    self._commit()
            except (ProtocolError, ConfigError) as exc:
                self._count_rejection("malformed-message")
                log.warning("aggregator: rejected a message on %s: %s", topic, exc)
            except ChainError as exc:  # the node is away: whatever needed it is tried again
                log.warning("aggregator: chain unavailable on %s: %s", topic or "tick", exc)
            except StorageFailed as exc:
                log.error("aggregator: %s", exc)
            except Exception:  # the service outlives any one message
                log.exception("aggregator: unexpected failure on %s", topic or "tick")
        self._commit_on_exit()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == _CONNECTED:
            self._announce_again()
            return
        if topic == self.topics.spec or topic.startswith(self.topics.context + "/"):
            if not self.has_terms:
                self._on_terms(topic, payload)
        elif topic == self.topics.model:
            self._stashed_model = payload  # the latest; taken once the terms are known
            self._model_retry.succeeded()
        elif not self.has_terms:
            if topic:
                self._count_rejection("before-terms")
                log.warning("aggregator: an update arrived before the task's terms; dropped")
        elif topic:
            self._on_update_chunk(topic, payload)
        if not self.has_terms and self._clock() - self._terms_warned_at > TERMS_PATIENCE_S:
            self._terms_warned_at = self._clock()
            log.warning("aggregator: still waiting for the task's spec and context on the broker")

    def _take_model(self) -> None:
        """The latest released model, once; again later if the chain could not vouch for it."""
        payload = self._stashed_model
        if payload is None or not self._model_retry.ready():
            return
        try:
            self._on_model(payload)
        except ChainError as exc:
            delay = self._model_retry.failed()
            log.warning("aggregator: cannot check the model on chain (retry %.1fs): %s", delay, exc)
            return
        self._stashed_model = None
        self._model_retry.succeeded()

    def _on_model(self, payload: bytes) -> None:
        try:
            model = envelope.decode(payload, "model", self.spec.max_message)
        except ProtocolError as exc:
            self._count_rejection("malformed-model")
            log.warning("aggregator: ignoring a malformed model message: %s", exc)
            return
        released = model["round"]
        if keccak(model["params"]) != model["model_hash"]:
            log.warning("aggregator: model %d does not match its hash; ignored", released)
            return
        if self._repeat is not None and released >= self._repeat[0]:
            self._repeat = None  # its model came: every key holder had the aggregate
        following = released + 1
        # The journal first: a round it knows is open already, or closed (perhaps not anchored
        # yet, the node being away); then the chain, for a journal that was lost.
        if following > self.spec.rounds or following <= self._journal.last_round() or self._open:
            return
        if self.chain.model_hash(self.spec.task_id, released) != model["model_hash"]:
            log.warning("aggregator: model %d is not the one anchored on chain", released)
            return
        if self.chain.round_anchor(self.spec.task_id, following) is not None:
            self._last_closed = max(self._last_closed, following)
            return
        self._open_round(following, model["model_hash"])

    def _repeat_aggregate(self) -> None:
        """The last aggregate again, the same bytes, while its round's model has not come."""
        if self._repeat is None or not self._repeat_retry.ready():
            return
        round_no, chunks = self._repeat
        for chunk in chunks:
            self._publish(self.topics.aggregate, chunk)
        delay = self._repeat_retry.failed()
        log.info("aggregator: round %d's aggregate sent again (no model yet; next in %.0fs)",
                 round_no, delay)  # fmt: skip

    def _open_round(self, round_no: int, model_hash: bytes) -> None:
        deadline = self._clock() + self.spec.round_seconds
        self._journal.open_round(round_no, model_hash, deadline)
        self._open = self._new_round(round_no, deadline)
        self._announcement = _announcement(round_no, model_hash, deadline)
        self._publish(self.topics.round, self._announcement, retain=True)
        log.info("aggregator: round %d open until %.0f", round_no, deadline)

    def _announce_again(self) -> None:
        """The open round's announcement, retained, on every (re)connection: a broker that
        restarted without its retained messages would otherwise leave devices that had not yet
        seen it unaware that the round exists, and the round would stall."""
        if self._open is not None and self._announcement is not None:
            self._publish(self.topics.round, self._announcement, retain=True)

    def _on_update_chunk(self, topic: str, payload: bytes) -> None:
        sender = TaskTopics.last_segment(topic)
        metrics.BYTES_IN.inc(len(payload))
        if self._open is not None:
            self.stats[self._open.terms.round].bytes_in += len(payload)
        try:
            whole = self._reassembler.add_with_id(sender, payload, check=False)
        except ChunkRejected as exc:
            self._reject_chunk(sender, exc)
            return
        if whole is not None:
            ident, blob = whole
            parse = self._parser.submit(self._parse, ident, blob)
            self._parsing.append((sender, ident, blob, parse))
            self._settle(every=False)

    def _parse(self, ident: bytes, blob: bytes) -> Parsed | ChunkRejected:
        """On a parser thread: the parse, or why the update is not the one its chunks named
        (an update's id is checked here, from its parse, rather than by reassembly: see
        :attr:`Update.ident`)."""
        parsed = Parsed.of(blob, self._domain, MAX_UPDATE_BYTES, self._vectors)
        if parsed.update is not None and parsed.update.ident != ident:
            return ChunkRejected("blob-mismatch", "reassembled update does not match its id")
        return parsed

    def _settle(self, every: bool) -> None:
        """Decide on parsed updates in arrival order: those parsed already, or (``every``)
        all of them, waiting for their parse; and always enough that no more than
        ``PARSE_AHEAD`` are in flight."""
        while self._parsing and (
            every or len(self._parsing) > PARSE_AHEAD or self._parsing[0][3].done()
        ):
            sender, ident, blob, parse = self._parsing.popleft()
            parsed = parse.result()
            if isinstance(parsed, ChunkRejected):
                self._reject_chunk(sender, parsed)
            elif self._held:  # keep arrival order behind the updates already waiting
                self._hold(sender, ident, blob)
            else:
                self._decide(sender, ident, blob, parsed)

    def _decide(self, sender: str, ident: bytes, blob: bytes, parsed: Parsed | None = None) -> bool:
        """Decide on one whole update (``ident``: its checked id; ``parsed``: its parse,
        when made already); False if it has to wait (and now waits). An accepted update is
        staged: :meth:`_commit` makes it durable and sends its receipt."""
        if self._open is None and not self.shard.leads:
            self._take_open_round()  # shard 0 may have opened one since the last look
        if self._open is None:
            if self.spec.late_updates and self._last_closed < self.spec.rounds:
                self._hold(sender, ident, blob)  # the next round decides: it may count it
                return False
            self._reject(sender, Rejected(RejectReason.CLOSED, "no round is open", ident))
            return True
        try:
            decision = self._open.offer(blob, ident=ident, parsed=parsed)
        except ChainError as exc:  # the registry cannot be read: ask again later
            if not self._held:
                log.warning("aggregator: registry unreadable, updates wait: %s", exc)
            self._hold(sender, ident, blob, front=True)
            self._held_retry.failed()
            return False
        if isinstance(decision, Rejected):
            self._reject(sender, decision)
            return True
        if not decision.repeat:
            self.archive.put_later(blob, ident)
            self._staged.append(decision)
            self._staged_bytes += len(blob)
        self._due.append(decision)
        return True

    def _batch_full(self) -> bool:
        return len(self._staged) >= BATCH_UPDATES or self._staged_bytes >= BATCH_BYTES

    def _commit(self) -> None:
        """Archive (fsynced), then journal, the staged updates, all in one go; only then do
        their receipts go out. If either fails, the open round goes back to what the journal
        holds, so the sum never counts an update a restart would not count, and the group
        gets no receipt (its devices send it again)."""
        staged, due = self._staged, self._due
        self._staged, self._staged_bytes, self._due = [], 0, []
        if staged:
            assert self._open is not None  # staged updates are the open round's
            try:
                self.archive.commit()
                self._journal.accept_many(
                    [
                        JournaledAcceptance(
                            a.counted_in,
                            a.blob_id.hex(),
                            a.update.device,
                            a.update.round,
                            self.shard.index,
                        )
                        for a in staged
                    ]
                )
            except (OSError, sqlite3.Error) as exc:
                journaled = self._journal.round(self._open.terms.round)
                assert journaled is not None
                self._open = self._rebuild(journaled, self.shard.owns)
                raise StorageFailed(
                    f"{len(staged)} accepted updates could not be stored, so they get no receipt "
                    f"(their devices send them again): {exc}"
                ) from exc
        counted = self._open.participants - len(staged) if self._open is not None else 0
        for accepted in due:
            update, round_no = accepted.update, accepted.counted_in
            if not accepted.repeat:
                counted += 1
                stats = self.stats[round_no]
                metrics.UPDATES_ACCEPTED.inc()
                stats.participants += 1
                stats.epsilon = max(stats.epsilon, update.epsilon)
                log.info(
                    "aggregator: round %d accepted %s%s (%d/%d)",
                    round_no,
                    update.device,
                    f", made for round {update.round}" if update.round != round_no else "",
                    counted,
                    self.expected,
                )
            device = bytes.fromhex(update.device[2:])
            self._receipt(device, update.round, accepted.blob_id, "", round_no)
            if not accepted.repeat and self._on_accepted is not None:
                self._on_accepted(round_no, counted)

    def _commit_on_exit(self) -> None:
        try:
            self._settle(every=True)
            self._commit()
        except Exception:  # stopping anyway: the devices send what got no receipt again
            log.exception("aggregator: the last accepted updates could not be made durable")

    def _hold(self, sender: str, ident: bytes, blob: bytes, front: bool = False) -> None:
        if self._held_bytes + len(blob) > HELD_MAX_BYTES:
            self._count_rejection("held-full")
            log.warning("aggregator: no room to hold an update from %s; it is dropped", sender)
            return
        if front:
            self._held.appendleft((sender, ident, blob))
        else:
            self._held.append((sender, ident, blob))
        self._held_bytes += len(blob)

    def _release_held(self) -> None:
        """Offer the waiting updates again, in order, until one has to wait once more; after
        the task's last round, refuse them (round-closed) rather than keep them."""
        next_round_to_come = self._open is None and self._last_closed < self.spec.rounds
        if next_round_to_come or not self._held_retry.ready():
            return
        while self._held:
            sender, ident, blob = self._held.popleft()
            self._held_bytes -= len(blob)
            if not self._decide(sender, ident, blob):
                return
        self._held_retry.succeeded()

    def _count_rejection(self, reason: str) -> None:
        """Counted in memory, in the metrics and, once the terms are known, in the journal
        (by the open round, else the last one closed), which the report and status page read."""
        self.rejections[reason] += 1
        metrics.UPDATES_REJECTED.labels(reason).inc()
        if self.has_terms:
            round_no = self._open.terms.round if self._open is not None else self._last_closed
            try:
                self._journal.count_rejection(round_no, reason)
            except sqlite3.Error as exc:  # a count lost is no reason to withhold the receipt
                log.warning("aggregator: cannot count a rejection in the journal: %s", exc)

    def _reject_chunk(self, sender: str, exc: ChunkRejected) -> None:
        self._count_rejection(exc.reason)
        log.warning("aggregator: rejected a chunk from %s: %s: %s", sender, exc.reason, exc)
        if self._open is not None:
            self.stats[self._open.terms.round].rejected += 1

    def _reject(self, sender: str, rejected: Rejected) -> None:
        who = rejected.device or sender
        self._count_rejection(str(rejected.reason))
        log.warning(
            "aggregator: rejected update from %s: %s: %s", who, rejected.reason, rejected.detail
        )
        if self._open is not None:
            stats = self.stats[self._open.terms.round]
            stats.rejected += 1
            stats.rejections.append(f"{who}: {rejected.reason}")
        if rejected.device is not None:  # the signer learns why, on its own receipt topic
            signer = bytes.fromhex(rejected.device[2:])
            self._receipt(signer, rejected.round or 0, rejected.blob_id, str(rejected.reason), 0)
        elif is_address(sender):  # unreadable: the topic's owner may be the sender
            self._receipt(bytes.fromhex(sender[2:]), 0, rejected.blob_id, str(rejected.reason), 0)

    def _receipt(
        self, device: bytes, round_no: int, ident: bytes, reason: str, counted_in: int
    ) -> None:
        """A receipt signed with this aggregator's chain key, to the device's receipt topic:
        devices drop an update from their outbox only on such a receipt."""
        account = self.chain.account
        if account is None:
            raise ChainError("the aggregator needs its chain key to sign receipts")
        receipt = Receipt(
            task=bytes.fromhex(self.task[2:]),
            round=round_no,
            device=device,
            update=ident,
            accepted=not reason,
            reason=reason,
            counted_in=counted_in,
        ).signed(account, self._domain)
        self._publish(self.topics.receipts(receipt.device_address), receipt.encode())

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> paho.MQTTMessageInfo:
        return self._link.publish(topic, payload, retain)

    def _tick(self) -> None:
        if not self.shard.leads:
            self._follow()
            self._release_held()
            return
        self._take_model()
        self._repeat_aggregate()
        self._release_held()
        self._try_merge()
        self._finish_closed()
        if self._open is None:
            return
        now = self._clock()
        if self._ready(now):
            self._settle(every=True)  # what came before the close is decided before it
            self._commit()  # the round's updates are durable before it closes
            if self.shard.shared:
                self._journal.mark_closing(self._open.terms.round)
                self._start_merge(self._open)
                self._open = None
                self._try_merge()
            else:
                self._closed(self._open.close())
        elif now >= self._open.terms.deadline and not self._deadline_logged:
            self._deadline_logged = True
            log.warning(
                "aggregator: round %d deadline passed with %d updates, quorum is %d; waiting",
                self._open.terms.round,
                self._open.participants,
                self.spec.quorum,
            )

    def _ready(self, now: float) -> bool:
        """Whether the open round may close; of a sharded aggregator, by every shard's tally
        (read from the journal at most every ``TALLY_EVERY_S``)."""
        assert self._open is not None
        if not self.shard.shared:
            return self._open.ready(now)
        if time.monotonic() - self._tallied_at < TALLY_EVERY_S:
            return False
        self._tallied_at = time.monotonic()
        return self._open.ready(now, self._journal.tally(self._open.terms.round))

    def _closed(self, closed: ClosedRound) -> None:
        """A round closed: its aggregate archived and journaled, then anchored and delivered."""
        self.archive.put(closed.aggregate)
        self._journal.set_state(closed.round, "closed")
        self._open = None
        self._last_closed = closed.round
        self._closing.append(closed)
        self._closing_retry.succeeded()
        self._finish_closed()
        self._release_held()  # late updates wait for the next round now

    def _start_merge(self, round_: OpenRound) -> None:
        """Shard 0 closes ``round_`` (marked closing in the journal): it counts no more in it
        and hands in its own partial sum; :meth:`_try_merge` merges them all once every shard
        has."""
        self._journal.put_partial(round_.terms.round, 0, round_.partial().encode())
        self._merging = round_
        self._last_closed = round_.terms.round
        log.info("aggregator: round %d closing; waiting for the shards' partial sums",
                 round_.terms.round)  # fmt: skip

    def _try_merge(self) -> None:
        """The closing round, merged, once every shard has handed in its partial sum."""
        if self._merging is None:
            return
        round_no = self._merging.terms.round
        running = range(self.shard.count)  # a shard no longer run: shard 0 counted its updates
        if not set(running) <= self._journal.handed_in(round_no):
            return  # asked again on the next tick; the sums themselves are read once all are in
        partials = self._journal.partials(round_no)
        closed = merge(
            [PartialRound.decode(partials[shard]) for shard in running],
            self._context,
            self.spec.n_params,
        )
        counted = {u.blob for u in self._journal.updates(round_no)}
        merged = {a.blob_id.hex() for a in closed.accepted}
        if merged != counted:  # the journal is what receipts were sent for: it decides
            log.error(
                "aggregator: round %d: the shards' partial sums hold %d updates, the journal "
                "counted %d (%d missing from the sums, %d not journaled); closing it from the "
                "journal's updates as archived instead",
                round_no,
                len(merged),
                len(counted),
                len(counted - merged),
                len(merged - counted),
            )
            journaled = self._journal.round(round_no)
            assert journaled is not None  # it was marked closing
            closed = self._rebuild(journaled).close()
        self._merging = None
        self.stats[round_no].participants = len(closed.accepted)
        self._closed(closed)

    def _follow(self) -> None:
        """A shard other than 0 follows the rounds shard 0 keeps in the journal: once shard 0
        closes the open round, it hands in its partial sum of it, then counts in the next."""
        if self._open is not None and self._journal.is_closing(self._open.terms.round):
            self._settle(every=True)
            self._commit()
            round_ = self._open
            partial = round_.partial()
            self._journal.put_partial(round_.terms.round, self.shard.index, partial.encode())
            self._open = None
            self._last_closed = round_.terms.round
            log.info("aggregator: shard %d handed in round %d with %d updates",
                     self.shard.index, round_.terms.round, len(partial.accepted))  # fmt: skip
        if self._open is None:
            self._take_open_round()

    def _take_open_round(self) -> None:
        """The round shard 0 opened, if this shard has not handed in its partial sum of it
        yet: rebuilt from what this shard counted in it before a restart, if anything."""
        for journaled in self._journal.rounds("open"):
            if journaled.round <= self._last_closed:
                continue
            if self.shard.index in self._journal.handed_in(journaled.round):
                self._last_closed = journaled.round
                continue
            self._open = self._rebuild(journaled, self.shard.owns)
            log.info("aggregator: shard %d counts in round %d", self.shard.index, journaled.round)
            return
        self._last_closed = max(self._last_closed, self._journal.last_round())

    def _finish_closed(self) -> None:
        """Anchor and deliver the closed rounds, oldest first, retrying with backoff."""
        while self._closing and self._closing_retry.ready():
            closed = self._closing[0]
            try:
                self._finish(closed)
            except DeliveryPending:
                return  # looked at again on the next tick: it costs nothing to ask
            except (ChainError, DeliveryFailed) as exc:
                delay = self._closing_retry.failed()
                log.warning(
                    "aggregator: round %d not finished yet (retry in %.1fs): %s",
                    closed.round,
                    delay,
                    exc,
                )
                return
            self._closing.popleft()
            self._closing_retry.succeeded()

    def _finish(self, closed: ClosedRound) -> None:
        """Anchor (once), then publish the manifest, the aggregate and the inclusion proofs,
        journaling each step; ``DeliveryPending`` until the broker has acknowledged them."""
        journaled = self._journal.round(closed.round)
        assert journaled is not None
        tx = journaled.anchor_tx
        if journaled.state == "closed":
            tx = self._anchor(closed)
            self._journal.set_state(closed.round, "anchored", tx)
            log.info("aggregator: round %d anchored in %s", closed.round, tx)
        assert tx is not None
        if closed.round not in self._deliveries:
            stats = self.stats[closed.round]
            stats.anchor_tx = tx
            stats.closed_at = self._clock()
            metrics.ROUND_CLOSE_SECONDS.observe(
                stats.closed_at - (journaled.deadline - self.spec.round_seconds)
            )
            self._deliveries[closed.round] = self._deliver(closed, tx)
            log.info(
                "aggregator: round %d closed with %d updates, root %s, anchored in %s",
                closed.round,
                len(closed.accepted),
                closed.root.hex()[:16],
                tx,
            )
            if self._on_closed is not None:  # the round's results are out
                self._on_closed(stats)
        states = {delivery(info) for info in self._deliveries[closed.round]}
        if "failed" in states:
            del self._deliveries[closed.round]  # published again on the next try
            raise DeliveryFailed(f"round {closed.round}: its results did not reach the broker")
        if "pending" in states:
            raise DeliveryPending(f"round {closed.round}: the broker has not acknowledged it")
        del self._deliveries[closed.round]
        self._journal.set_state(closed.round, "delivered")

    def _deliver(self, closed: ClosedRound, tx: str) -> list[paho.MQTTMessageInfo]:
        self.archive.put_round(
            RoundManifest(
                task=self.spec.task,
                round=closed.round,
                updates=tuple(a.blob_id.hex() for a in closed.accepted),
                root=closed.root.hex(),
                aggregate=keccak(closed.aggregate).hex(),
                aggregate_hash=closed.aggregate_hash.hex(),
                anchor_tx=tx,
            )
        )
        aggregate = envelope.encode(
            "aggregate",
            round=closed.round,
            ciphertext=closed.aggregate,
            updates=len(closed.accepted),
            samples=closed.samples,
            root=closed.root,
            anchor_tx=tx,
        )
        chunks = split(aggregate, self._link.max_message)
        sent = [self._publish(self.topics.aggregate, chunk) for chunk in chunks]
        self._repeat = (closed.round, chunks)
        self._repeat_retry.succeeded()
        self._repeat_retry.failed()  # the first repeat is due after up to REPEAT_BASE_S
        for accepted in closed.accepted:
            inclusion = envelope.encode(
                "inclusion",
                round=closed.round,
                leaf=accepted.leaf,
                proof=closed.proof(accepted.leaf),
                root=closed.root,
                anchor_tx=tx,
            )
            topic = self.topics.receipts(accepted.update.device)
            sent.append(self._publish(topic, inclusion))
        return sent

    def _anchor(self, closed: ClosedRound) -> str:
        task_id = self.spec.task_id
        existing = self.chain.round_anchor(task_id, closed.round)
        if existing is not None:
            if existing.updates_root != closed.root:
                raise ChainError(f"round {closed.round} is anchored with a different root")
            tx = self.chain.anchor_tx(task_id, closed.round)
            if tx is None:
                raise ChainError(f"round {closed.round} is anchored but its event is missing")
            return tx
        metrics.ANCHOR_ATTEMPTS.labels("round").inc()
        with metrics.ANCHOR_FAILURES.labels("round").count_exceptions(ChainError):
            return self.chain.anchor_round(
                task_id, closed.round, closed.root, closed.aggregate_hash, len(closed.accepted)
            )


_CONNECTED = "\x00connected"  # queued on every (re)connection; no MQTT topic holds a NUL


def _announcement(round_no: int, model_hash: bytes, deadline: float) -> bytes:
    return envelope.encode("round", round=round_no, model_hash=model_hash, deadline=deadline)
