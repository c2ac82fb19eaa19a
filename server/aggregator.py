"""The aggregator service: MQTT, archive and chain wrapped around :mod:`server.rounds`.

Messages arrive on paho's network thread and are queued; one worker thread does the work in
order, so the round state needs no locks. An update is archived (fsynced) before its receipt
is sent, a round is anchored before its aggregate goes to the owner, and anchoring checks the
chain first, so a retry after a failure never anchors a round twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eth_utils import is_address, keccak

from truscl.chain import ChainClient
from truscl.errors import ChainError, ConfigError, ProtocolError
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.ckks import aggregator_context_bytes, load_context
from truscl.server.archive import Archive, RoundManifest
from truscl.server.rounds import (
    Accepted,
    ClosedRound,
    OpenRound,
    Rejected,
    RejectReason,
    RoundTerms,
)
from truscl.systemd import Heartbeat
from truscl.task import MAX_MESSAGE_LIMIT, SPEC_MAX_BYTES, TaskSpec
from truscl.wire import Domain, Reassembler, TaskTopics, blob_id, envelope
from truscl.wire.receipt import Receipt
from truscl.wire.update import MAX_UPDATE_BYTES

log = logging.getLogger(__name__)

ANCHOR_RETRY_S = 2.0
TERMS_PATIENCE_S = 30.0  # how often a service still waiting for its task's terms says so


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


class Aggregator:
    """The aggregator of one task.

    Its terms (spec and public HE context) are given, or read from the archive, or taken from
    the task's retained MQTT topics; whichever way, they are checked against the hashes the
    owner anchored on chain before any update is looked at.
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
        clock: Callable[[], float] = time.time,
        on_closed: Callable[[RoundStats], None] | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        task = task or (spec.task if spec is not None else None)
        if task is None:
            raise ProtocolError("an aggregator serves one task: give its id or its spec")
        self.task = task.lower()
        self.topics = TaskTopics(self.task)
        self.chain = chain
        self.archive = archive
        self.expected = expected
        self.stats: dict[int, RoundStats] = {}
        self.spec: TaskSpec  # set by _adopt, before any update is looked at
        self._clock = clock
        self._on_closed = on_closed
        self._heartbeat = heartbeat
        self._terms_warned_at = clock()
        self._domain = Domain(chain.chain_id, chain.address)
        self._registered: set[str] = set()
        self._open: OpenRound | None = None
        self._unanchored: ClosedRound | None = None
        self._next_anchor_try = 0.0
        self._last_closed = 0
        self._deadline_logged = False
        self._terms_ready = threading.Event()
        self._retained_spec: TaskSpec | None = None
        self._context_chunks = Reassembler(max_message=MAX_MESSAGE_LIMIT)
        self._retained_context: bytes | None = None
        self._stashed_model: bytes | None = None
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="aggregator", daemon=True)
        self._link = MqttLink(
            f"truscl-aggregator-{self.task[2:10]}",
            broker,
            on_message=lambda topic, payload: self._inbox.put((topic, payload)),
            subscriptions=[
                self.topics.all_updates,
                self.topics.model,
                self.topics.spec,
                f"{self.topics.context}/+",
            ],
        )
        if spec is not None and public_context is not None:
            if keccak(public_context).hex() != spec.context_hash.removeprefix("0x"):
                raise ProtocolError("public context does not match the task's context hash")
            self._adopt(spec, public_context)
        else:
            self._adopt_archived()

    @property
    def has_terms(self) -> bool:
        return self._terms_ready.is_set()

    def wait_for_terms(self, timeout: float | None = None) -> bool:
        """Whether the task's spec and context are known (they may come from the broker)."""
        return self._terms_ready.wait(timeout)

    def _adopt(self, spec: TaskSpec, public_context: bytes) -> None:
        self.spec = spec
        self._context = load_context(aggregator_context_bytes(public_context))  # no key at all
        self._reassembler = Reassembler(max_message=spec.max_message, max_blob=MAX_UPDATE_BYTES)
        self._link.max_message = spec.max_message
        self.archive.put_task(spec.task, spec.encode(), public_context)
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
            if self._stashed_model is not None:
                self._on_model(self._stashed_model)

    def start(self) -> Aggregator:
        self._worker.start()
        self._link.start()
        return self

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self) -> None:
        self._inbox.put(None)
        self._worker.join(10)
        self._link.close()

    # -- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.1)
            except queue.Empty:
                item = ("", b"")
            if item is None:
                return
            if self._heartbeat is not None:
                self._heartbeat.beat()
            topic, payload = item
            try:
                self._dispatch(topic, payload)
            except (ProtocolError, ConfigError) as exc:
                log.warning("aggregator: rejected a message on %s: %s", topic, exc)
            except Exception:  # the service outlives any one message
                log.exception("aggregator: unexpected failure on %s", topic or "tick")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.spec or topic.startswith(self.topics.context + "/"):
            if not self.has_terms:
                self._on_terms(topic, payload)
        elif not self.has_terms:
            if topic == self.topics.model:
                self._stashed_model = payload  # the latest; taken once the terms are known
            elif topic:
                log.warning("aggregator: an update arrived before the task's terms; dropped")
        elif topic == self.topics.model:
            self._on_model(payload)
        elif topic:
            self._on_update_chunk(topic, payload)
        if self.has_terms:
            self._tick()
        elif self._clock() - self._terms_warned_at > TERMS_PATIENCE_S:
            self._terms_warned_at = self._clock()
            log.warning("aggregator: still waiting for the task's spec and context on the broker")

    def _on_model(self, payload: bytes) -> None:
        try:
            model = envelope.decode(payload, "model", self.spec.max_message)
        except ProtocolError as exc:
            log.warning("aggregator: ignoring a malformed model message: %s", exc)
            return
        released = model["round"]
        if keccak(model["params"]) != model["model_hash"]:
            log.warning("aggregator: model %d does not match its hash; ignored", released)
            return
        if self.chain.model_hash(self.spec.task_id, released) != model["model_hash"]:
            log.warning("aggregator: model %d is not the one anchored on chain", released)
            return
        following = released + 1
        if following > self.spec.rounds or following <= self._last_closed or self._open:
            return
        if self.chain.round_anchor(self.spec.task_id, following) is not None:
            self._last_closed = following  # closed before a restart; its model comes next
            return
        self._open_round(following, model["model_hash"])

    def _open_round(self, round_no: int, model_hash: bytes) -> None:
        deadline = self._clock() + self.spec.round_seconds
        terms = RoundTerms(
            task=self.spec.task_id,
            round=round_no,
            context_hash=bytes.fromhex(self.spec.context_hash[2:]),
            n_params=self.spec.n_params,
            quorum=self.spec.quorum,
            expected=self.expected,
            deadline=deadline,
            max_update_bytes=MAX_UPDATE_BYTES,
        )
        self._open = OpenRound(terms, self._domain, self._context, self._is_registered)
        self.stats[round_no] = RoundStats(round_no)
        self._deadline_logged = False
        self._link.publish(
            self.topics.round,
            envelope.encode("round", round=round_no, model_hash=model_hash, deadline=deadline),
            retain=True,
        )
        log.info("aggregator: round %d open until %.0f", round_no, deadline)

    def _on_update_chunk(self, topic: str, payload: bytes) -> None:
        sender = TaskTopics.last_segment(topic)
        if self._open is not None:
            self.stats[self._open.terms.round].bytes_in += len(payload)
        try:
            blob = self._reassembler.add(sender, payload)
        except ProtocolError as exc:
            self._reject_chunk(sender, exc)
            return
        if blob is None:
            return
        if self._open is None:
            decision: Accepted | Rejected = Rejected(
                RejectReason.CLOSED, "no round is open", blob_id(blob), None
            )
        else:
            decision = self._open.offer(blob)
        if isinstance(decision, Rejected):
            self._reject(sender, decision)
            return
        if not decision.repeat:
            self.archive.put(blob)
            stats = self.stats[decision.update.round]
            stats.participants += 1
            stats.epsilon = max(stats.epsilon, decision.update.epsilon)
            log.info(
                "aggregator: round %d accepted %s (%d/%d)",
                decision.update.round,
                decision.update.device_address,
                self._open.participants,  # type: ignore[union-attr]
                self.expected,
            )
        update = decision.update
        self._receipt(update.device, update.round, decision.blob_id, "", update.round)

    def _reject_chunk(self, sender: str, exc: ProtocolError) -> None:
        log.warning("aggregator: rejected a chunk from %s: %s", sender, exc)
        if self._open is not None:
            self.stats[self._open.terms.round].rejected += 1

    def _reject(self, sender: str, rejected: Rejected) -> None:
        who = rejected.device or sender
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
        self._link.publish(self.topics.receipts(receipt.device_address), receipt.encode())

    def _tick(self) -> None:
        now = self._clock()
        if self._unanchored is not None and now >= self._next_anchor_try:
            self._finish(self._unanchored)
        if self._open is None:
            return
        if self._open.ready(now):
            closed = self._open.close()
            self._open = None
            self._last_closed = closed.round
            self._finish(closed)
        elif now >= self._open.terms.deadline and not self._deadline_logged:
            self._deadline_logged = True
            log.warning(
                "aggregator: round %d deadline passed with %d updates, quorum is %d; waiting",
                self._open.terms.round,
                self._open.participants,
                self.spec.quorum,
            )

    def _finish(self, closed: ClosedRound) -> None:
        """Archive, anchor (once), then release the aggregate and the inclusion proofs."""
        aggregate_id = self.archive.put(closed.aggregate)
        try:
            tx = self._anchor(closed)
        except ChainError as exc:
            self._unanchored = closed
            self._next_anchor_try = self._clock() + ANCHOR_RETRY_S
            log.error("aggregator: anchoring round %d failed, will retry: %s", closed.round, exc)
            return
        self._unanchored = None
        self.archive.put_round(
            RoundManifest(
                task=self.spec.task,
                round=closed.round,
                updates=tuple(a.blob_id.hex() for a in closed.accepted),
                root=closed.root.hex(),
                aggregate=aggregate_id,
                aggregate_hash=closed.aggregate_hash.hex(),
                anchor_tx=tx,
            )
        )
        self._link.publish_blob(
            self.topics.aggregate,
            envelope.encode(
                "aggregate",
                round=closed.round,
                ciphertext=closed.aggregate,
                updates=len(closed.accepted),
                samples=closed.samples,
                root=closed.root,
                anchor_tx=tx,
            ),
        )
        for accepted in closed.accepted:
            inclusion = envelope.encode(
                "inclusion",
                round=closed.round,
                leaf=accepted.leaf,
                proof=closed.proof(accepted.leaf),
                root=closed.root,
                anchor_tx=tx,
            )
            self._link.publish(self.topics.receipts(accepted.update.device_address), inclusion)
        stats = self.stats[closed.round]
        stats.anchor_tx = tx
        stats.closed_at = self._clock()
        log.info(
            "aggregator: round %d closed with %d updates, root %s, anchored in %s",
            closed.round,
            len(closed.accepted),
            closed.root.hex()[:16],
            tx,
        )
        if self._on_closed is not None:
            self._on_closed(stats)

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
        return self.chain.anchor_round(
            task_id, closed.round, closed.root, closed.aggregate_hash, len(closed.accepted)
        )

    def _is_registered(self, device: str) -> bool:
        if device in self._registered:
            return True
        if self.chain.is_device(device):
            self._registered.add(device)
            return True
        return False
