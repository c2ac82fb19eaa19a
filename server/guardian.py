"""A key guardian: holds one share of a task's CKKS key and decrypts only what it must.

The guardian reads the aggregate the aggregator sends the owner (it reads no device update) and
answers with its partial decryption ``d_i = c1 * s_i + E_i`` only when every check passes:

1. the round is anchored on chain for this task, and the aggregate's keccak is the anchored
   hash: a request to decrypt anything else, a single device's update say, has no anchor;
2. the anchor counts at least the task's minimum cohort of accepted updates (on chain): an
   "aggregate" of one update is that device's update;
3. it has not answered for this round before: fresh smudging noise on a second answer for the
   same ciphertext would let whoever averages the answers strip it.

Before publishing, the partial (signed with the guardian's chain key) is written to its state
folder: that file is the durable record of the round, so a guardian restarted at any point
never decrypts a round twice, and publishes the same bytes again rather than new ones. Every
refusal is logged with its reason and counted (in memory and in ``refusals.json``).

Smudging noise comes from a PCG64 generator seeded per call with 256 bits of the OS's CSPRNG
(truscl.privacy.dp.secure_generator), sigma ``SMUDGING_SIGMA`` = 2^20 per coefficient
(OpenFHE's default flooding level; a heuristic, see docs/privacy.md).
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from eth_account.signers.local import LocalAccount

from truscl.chain import ChainClient
from truscl.errors import ConfigError, ProtocolError
from truscl.files import write_atomically
from truscl.hashing import keccak
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.ckks import load_context
from truscl.privacy.threshold import KeyShare
from truscl.systemd import Heartbeat, worker_items
from truscl.task import MAX_MESSAGE_LIMIT, SPEC_MAX_BYTES, TaskSpec
from truscl.wire import Reassembler, TaskTopics, envelope, split
from truscl.wire.keyholders import PartialMessage
from truscl.wire.signing import Domain

log = logging.getLogger(__name__)

TICK_S = 1.0
# Aggregate chunks kept while the spec has not come yet (it is retained, so it normally comes
# first); beyond this the oldest are dropped rather than memory growing without bound.
MAX_WAITING_CHUNKS = 256


class Refused(ProtocolError):
    """A decryption request the guardian will not answer, with the reason it counts."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


UNANCHORED = "unanchored"
NOT_THE_ANCHORED_AGGREGATE = "not-the-anchored-aggregate"
UNDER_COHORT = "under-cohort"


class GuardianRecords:
    """The guardian's durable records: one file per round it answered, and its refusals."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder) / "partials"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.refusals_file = Path(folder) / "refusals.json"

    def answered(self, round_no: int) -> bytes | None:
        path = self.folder / f"{round_no}.cbor"
        return path.read_bytes() if path.exists() else None

    def answer(self, round_no: int, message: bytes) -> None:
        write_atomically(self.folder / f"{round_no}.cbor", message)

    def latest(self) -> bytes | None:
        rounds = sorted(int(p.stem) for p in self.folder.glob("*.cbor"))
        return self.answered(rounds[-1]) if rounds else None

    def refusals(self) -> collections.Counter[str]:
        if not self.refusals_file.exists():
            return collections.Counter()
        return collections.Counter(json.loads(self.refusals_file.read_text()))

    def save_refusals(self, counts: collections.Counter[str]) -> None:
        write_atomically(self.refusals_file, (json.dumps(dict(counts), indent=1) + "\n").encode())


class _Event(enum.Enum):
    CONNECTED = "connected"  # queued by the link on every (re)connection
    TICK = "tick"  # the loop's idle wake-up


class Guardian:
    """The guardian's role for one task: it takes the task's spec from the broker once the
    chain vouches for it, then checks, decrypts its part of and publishes each aggregate."""

    def __init__(
        self,
        *,
        task: str,
        owner: str,
        name: str,
        share: KeyShare,
        public_context: bytes,
        keygen_digest: bytes,
        chain: ChainClient,
        account: LocalAccount,
        broker: BrokerSettings,
        records: GuardianRecords,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        if share.holder_id != name:
            raise ConfigError(f"the key share in the state folder is not {name}'s")
        self.name = name
        self.owner = owner
        self.share = share
        self.keygen_digest = keygen_digest
        self.chain = chain
        self.account = account
        self.broker = broker
        self.records = records
        self.refusals = records.refusals()
        self.spec: TaskSpec | None = None
        self.public_context = public_context
        self._context = load_context(public_context)
        self._domain = Domain(chain.chain_id, chain.address)
        self._topics = TaskTopics(task)
        self._task_id = bytes.fromhex(task[2:])
        self._heartbeat = heartbeat
        self._link: MqttLink | None = None
        self._waiting: list[bytes] = []  # aggregate chunks that came before the spec
        self._inbox: queue.Queue[tuple[str, bytes] | _Event | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="guardian", daemon=True)

    def accept_spec(self, spec: TaskSpec) -> None:
        """Take the task's terms, if the chain and this guardian's key generation vouch for
        them: the spec's hash and the context's on chain, the owner it joined, its own name
        and address among the holders, and the transcript it signed."""
        task = self.chain.task(self._task_id)
        problems = []
        if spec.task_id != self._task_id or spec.hash() != task.spec_hash:
            problems.append("the spec is not the one anchored on chain")
        if task.owner.lower() != self.owner.lower():
            problems.append(f"the task's owner is {task.owner}, not {self.owner}")
        if "0x" + task.context_hash.hex() != spec.context_hash or spec.context_hash != (
            "0x" + keccak(self.public_context).hex()
        ):
            problems.append("the task's context is not the one this guardian's keygen made")
        if spec.keygen_digest != "0x" + self.keygen_digest.hex():
            problems.append("the spec names another key-generation transcript")
        if (self.name, self.account.address.lower()) not in spec.key_holders:
            problems.append(f"the spec does not name {self.name} a key holder")
        if problems:
            raise ProtocolError("; ".join(problems))
        self.spec = spec

    def start(self) -> Guardian:
        self._link = MqttLink(
            f"truscl-guardian-{self.name}-{self._topics.task_hex[2:10]}",
            self.broker,
            on_message=lambda topic, payload: self._inbox.put((topic, payload)),
            subscriptions=[self._topics.spec, self._topics.aggregate],
            max_message=MAX_MESSAGE_LIMIT,
            on_connected=lambda: self._inbox.put(_Event.CONNECTED),
        ).start(timeout=None)
        self._worker.start()
        return self

    def stop(self) -> None:
        self._inbox.put(None)
        if self._worker.is_alive():
            self._worker.join(10)
        if self._link is not None:
            self._link.close()

    def _run(self) -> None:
        reassembler = Reassembler(max_message=MAX_MESSAGE_LIMIT)
        items: Iterator[tuple[str, bytes] | _Event] = worker_items(
            self._inbox.get, self._heartbeat, TICK_S, _Event.TICK
        )
        for payload in items:
            if payload is _Event.TICK:
                continue
            try:
                if payload is _Event.CONNECTED:
                    self._republish_latest()
                    continue
                topic, data = payload
                if topic == self._topics.spec:
                    if self.spec is None:
                        fields = envelope.decode(data, "spec", SPEC_MAX_BYTES)
                        self.accept_spec(TaskSpec.from_dict(fields["spec"]))
                        log.info("guardian %s: serving task %s", self.name, self._topics.task_hex)
                        self._republish_latest()
                        waiting, self._waiting = self._waiting, []
                        for chunk in waiting:
                            self._inbox.put((self._topics.aggregate, chunk))
                    continue
                if self.spec is None:
                    self._waiting = [*self._waiting, data][-MAX_WAITING_CHUNKS:]
                    continue
                blob = reassembler.add("aggregator", data)
                if blob is not None:
                    self.publish(self.answer(blob))
            except Refused:
                continue  # logged and counted by answer()
            except (ProtocolError, ConfigError) as exc:
                log.warning("guardian %s: dropped a message: %s", self.name, exc)
            except Exception:
                log.exception("guardian %s: unexpected failure on a message", self.name)

    def answer(self, blob: bytes) -> bytes:
        """The signed partial-decryption message for an aggregate message, once every check of
        the module passes, recorded before it is returned; ``Refused`` otherwise."""
        spec = self.spec
        if spec is None:
            raise ProtocolError("no task spec yet")
        message = envelope.decode(blob, "aggregate", len(blob))
        round_no, ciphertext = message["round"], message["ciphertext"]
        anchor = self.chain.round_anchor(self._task_id, round_no)
        if anchor is None:
            raise self._refuse(UNANCHORED, f"round {round_no} is not anchored")
        if keccak(ciphertext) != anchor.aggregate_hash:
            raise self._refuse(
                NOT_THE_ANCHORED_AGGREGATE, f"this is not round {round_no}'s anchored aggregate"
            )
        cohort = self.chain.min_cohort(self._task_id)
        if anchor.updates < cohort:
            raise self._refuse(
                UNDER_COHORT, f"round {round_no} counts {anchor.updates} < {cohort} updates"
            )
        answered = self.records.answered(round_no)
        if answered is not None:  # sent again (the aggregator repeats it until a model comes):
            log.info("guardian %s: round %d answered again, the same bytes", self.name, round_no)
            return answered  # the recorded answer, never a second decryption
        partial = self.share.partial_decrypt(self._context, ciphertext, spec.n_params)
        signed = PartialMessage(
            task=self._task_id,
            round=round_no,
            holder=self.name,
            aggregate=anchor.aggregate_hash,
            partial=partial.to_bytes(),
        ).signed(self.account, self._domain)
        encoded = signed.encode()
        self.records.answer(round_no, encoded)
        log.info("guardian %s: decrypted its part of round %d", self.name, round_no)
        return encoded

    def publish(self, encoded: bytes) -> None:
        """Retained, in chunks of the task's ``max_message`` (one sub-topic each)."""
        assert self._link is not None and self.spec is not None
        topic = self._topics.partial(self.name)
        for index, chunk in enumerate(split(encoded, self.spec.max_message)):
            self._link.publish(f"{topic}/{index}", chunk, retain=True)

    def _republish_latest(self) -> None:
        """On every (re)connection once the spec is known: the last answer again (the same
        bytes, not a new decryption), for a broker that lost its retained messages."""
        latest = self.records.latest()
        if latest is not None and self.spec is not None:
            self.publish(latest)

    def _refuse(self, reason: str, detail: str) -> Refused:
        self.refusals[reason] += 1
        self.records.save_refusals(self.refusals)
        log.warning(
            "guardian %s: refused to decrypt (%s): %s; %d refusal(s) so far",
            self.name,
            reason,
            detail,
            sum(self.refusals.values()),
        )
        return Refused(reason, detail)
