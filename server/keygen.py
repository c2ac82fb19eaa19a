"""Distributed key generation over MQTT: the owner and its guardians make one CKKS key.

The secret key is ``s = s_1 + ... + s_k``, one share per key holder, and no share ever leaves
its holder (:mod:`truscl.privacy.threshold` does the arithmetic). This module carries the
protocol: retained topics ``truscl/v1/<task>/keygen/<holder>/<step>`` on the task's broker, one
per holder and step, each message signed with the holder's chain key
(:class:`truscl.wire.keyholders.KeygenMessage`), so neither another client nor the broker's
operator can put words in a holder's mouth. Retained, because holders start at different
times: a guardian started after the owner finds everything the owner already said.

1. ``session`` (owner only): the CKKS profile and the holders, each by name and address.
2. ``seed-commitment``, then after all of them ``seed-reveal``: the seed of the common
   polynomial ``a`` is the hash of all reveals, so no holder can steer it.
3. ``contribution-commitment``, then after all of them ``contribution`` (``b_i``): no holder
   sees another's contribution before it is bound to its own (no rogue key).
4. ``transcript``: each holder signs the digest of the whole transcript it computed; the
   holders agree on the collective public context only when every signature is on the same
   digest. The owner puts that digest in the task's spec, whose hash goes on chain.

A holder keeps its share, its seed share and its contribution in its state folder before
publishing anything derived from them, so a key generation cut short and run again repeats
the same messages rather than contradicting the retained ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cbor2
from eth_account.signers.local import LocalAccount

from truscl.chain import TaskRecord
from truscl.errors import ConfigError, HeError, ProtocolError
from truscl.files import write_atomically
from truscl.keyfile import read_secret, write_secret
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.ckks import PROFILES, context_hash
from truscl.privacy.threshold import (
    KeygenTranscript,
    KeyShare,
    SeedShare,
    collective_public_context,
    common_seed,
    contribution_commitment,
    require_threshold,
)
from truscl.task import TaskSpec
from truscl.wire import Reassembler, TaskTopics
from truscl.wire.keyholders import (
    CONTRIBUTION,
    CONTRIBUTION_COMMITMENT,
    MAX_KEYHOLDER_MESSAGE,
    SEED_COMMITMENT,
    SEED_REVEAL,
    SESSION,
    TRANSCRIPT,
    KeygenMessage,
    check_holder_name,
)
from truscl.wire.signing import Domain

log = logging.getLogger(__name__)

KEYGEN_TIMEOUT_S = 600.0  # how long a holder waits for the others at each step
# Chunk size of keygen messages, for every holder alike (they start before any task's
# max_message is agreed): well under any broker's limit, two chunks per ckks-4096 contribution.
KEYGEN_MESSAGE = 64 * 1024
_RECORD_VERSION = 1


@dataclass(frozen=True)
class KeygenTerms:
    """The owner's call: which profile, and which holders (name and address), sorted by name."""

    profile: str
    holders: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.holders]
        if len(names) < 2 or names != sorted(set(names)):
            raise ConfigError("a threshold key needs two or more holders with distinct names")
        for name, _ in self.holders:
            check_holder_name(name)
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown CKKS profile {self.profile!r}")
        try:
            require_threshold(PROFILES[self.profile])
        except HeError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def addresses(self) -> dict[str, str]:
        return dict(self.holders)

    def encode(self) -> bytes:
        holders = [[name, address.lower()] for name, address in self.holders]
        return cbor2.dumps({"profile": self.profile, "holders": holders}, canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> KeygenTerms:
        try:
            fields = cbor2.loads(data)
            holders = tuple((str(n), str(a)) for n, a in fields["holders"])
            return cls(str(fields["profile"]), holders)
        except (ValueError, TypeError, KeyError, cbor2.CBORDecodeError) as exc:
            raise ProtocolError(f"malformed keygen session: {exc}") from None


@dataclass(frozen=True)
class KeygenRecord:
    """The transcript and every holder's signature on its digest: what anyone needs to check
    that the task's public context came from these holders' contributions and nobody else's.
    Archived by every holder (``keygen.cbor`` in its state folder)."""

    task: bytes
    terms: KeygenTerms
    transcript: KeygenTranscript
    signatures: tuple[bytes, ...]  # in holder order, each over the ``transcript`` step

    def encode(self) -> bytes:
        t = self.transcript
        return cbor2.dumps(
            {
                "v": _RECORD_VERSION,
                "task": self.task,
                "profile": self.terms.profile,
                "holders": [[n, a.lower()] for n, a in self.terms.holders],
                "seed_commitments": list(t.seed_commitments),
                "seed_reveals": list(t.seed_reveals),
                "contribution_commitments": list(t.contribution_commitments),
                "contributions": list(t.contributions),
                "context_hash": t.context_hash,
                "signatures": list(self.signatures),
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> KeygenRecord:
        try:
            f = cbor2.loads(data)
            if f["v"] != _RECORD_VERSION:
                raise ProtocolError(f"keygen record version {f['v']!r}")
            terms = KeygenTerms(f["profile"], tuple((n, a) for n, a in f["holders"]))
            transcript = KeygenTranscript(
                profile=terms.profile,
                holders=tuple(n for n, _ in terms.holders),
                seed_commitments=tuple(f["seed_commitments"]),
                seed_reveals=tuple(f["seed_reveals"]),
                contribution_commitments=tuple(f["contribution_commitments"]),
                contributions=tuple(f["contributions"]),
                context_hash=f["context_hash"],
            )
            return cls(f["task"], terms, transcript, tuple(f["signatures"]))
        except (ValueError, TypeError, KeyError, cbor2.CBORDecodeError) as exc:
            raise ProtocolError(f"malformed keygen record: {exc}") from None

    def verify(self, domain: Domain) -> bytes:
        """Recompute the public context from the record and check every holder's signature on
        the transcript's digest; returns the public context (``HeError`` or
        ``SignatureError`` otherwise)."""
        context = self.transcript.verify()
        digest = self.transcript.digest()
        if len(self.signatures) != len(self.terms.holders):
            raise ProtocolError("the record needs one signature per holder")
        for (name, address), signature in zip(self.terms.holders, self.signatures, strict=True):
            KeygenMessage(self.task, name, TRANSCRIPT, digest, signature).verify(domain, address)
        return context


def audit_keygen(record: KeygenRecord, spec: TaskSpec, task: TaskRecord, domain: Domain) -> bytes:
    """What an auditor checks of a threshold task's key: the archived record verifies (every
    commitment opens, the context follows from the contributions, every holder signed the
    transcript), the chain's context is that one, and the anchored spec names these holders and
    this transcript. Returns the public context; ``ProtocolError`` or ``HeError`` otherwise."""
    context = record.verify(domain)
    problems = []
    if record.task != spec.task_id or spec.hash() != task.spec_hash:
        problems.append("the spec is not the task's anchored spec")
    if context_hash(context) != task.context_hash:
        problems.append("the task's context on chain is not the transcript's")
    if spec.keygen_digest != "0x" + record.transcript.digest().hex():
        problems.append("the spec names another transcript")
    if spec.key_holders != tuple((n, a.lower()) for n, a in record.terms.holders):
        problems.append("the spec names other key holders")
    if problems:
        raise ProtocolError("; ".join(problems))
    return context


class HolderState:
    """A key holder's keygen files in its state folder: share and seed share (0600), its
    contribution (public, but kept so a rerun publishes the same one) and the record."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.share_file = self.folder / "he-key-share"
        self.seed_file = self.folder / "keygen-seed-share"
        self.contribution_file = self.folder / "keygen-contribution"
        self.record_file = self.folder / "keygen.cbor"
        self.context_file = self.folder / "public-context"

    def share(self, name: str, profile: str) -> KeyShare:
        if self.share_file.exists():
            share = KeyShare.from_bytes(read_secret(self.share_file))
            if share.holder_id != name or share.profile.name != profile:
                raise ConfigError(f"{self.share_file} is {share}, not {name}'s for {profile}")
            return share
        self.folder.mkdir(parents=True, exist_ok=True)
        share = KeyShare.generate(name, PROFILES[profile])
        write_secret(self.share_file, share.to_bytes())
        return share

    def seed(self, name: str) -> SeedShare:
        if self.seed_file.exists():
            return SeedShare(name, read_secret(self.seed_file))
        seed = SeedShare.generate(name)
        write_secret(self.seed_file, seed.value)
        return seed

    def contribution(self, share: KeyShare, seed: bytes) -> bytes:
        """``b_i`` for this seed: computed once (its error term is random), then reread."""
        if self.contribution_file.exists():
            data = self.contribution_file.read_bytes()
            if data[:32] == seed:
                return data[32:]
        contribution = share.public_contribution(seed)
        write_atomically(self.contribution_file, seed + contribution)
        return contribution

    def record(self) -> KeygenRecord | None:
        if not self.record_file.exists():
            return None
        return KeygenRecord.decode(self.record_file.read_bytes())

    def save(self, record: KeygenRecord, public_context: bytes) -> None:
        write_atomically(self.context_file, public_context)
        write_atomically(self.record_file, record.encode())

    def public_context(self) -> bytes:
        return self.context_file.read_bytes()


class KeygenBoard:
    """The task's retained keygen topics as one holder sees them: every message checked for its
    task, topic and signature as it arrives, then waited for step by step."""

    def __init__(
        self,
        *,
        task: str,
        name: str,
        account: LocalAccount,
        domain: Domain,
        broker: BrokerSettings,
        timeout: float = KEYGEN_TIMEOUT_S,
    ) -> None:
        self.task, self.name, self.account, self.domain = task, name, account, domain
        self.timeout = timeout
        self._topics = TaskTopics(task)
        self._messages: dict[tuple[str, str], KeygenMessage] = {}
        self._changed = threading.Condition()
        self._reassembler = Reassembler(max_message=KEYGEN_MESSAGE, max_blob=MAX_KEYHOLDER_MESSAGE)
        self._link = MqttLink(
            f"truscl-keygen-{name}-{task[2:10]}",
            broker,
            on_message=self._receive,
            subscriptions=[self._topics.all_keygen],
            max_message=KEYGEN_MESSAGE,
        )

    def __enter__(self) -> KeygenBoard:
        self._link.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._link.close()

    def _receive(self, topic: str, payload: bytes) -> None:
        """Network thread: keep whole, well-formed messages; the waiters check signatures."""
        sender = topic.rsplit("/", 1)[0]  # .../keygen/<holder>/<step>
        try:
            blob = self._reassembler.add(sender, payload)
            if blob is None:
                return
            message = KeygenMessage.decode(blob)
        except ProtocolError as exc:
            log.warning("keygen: dropped a message on %s: %s", topic, exc)
            return
        holder, step = sender.rsplit("/", 2)[-2:]
        if (message.holder, message.step) != (holder, step) or message.task != bytes.fromhex(
            self.task[2:]
        ):
            log.warning("keygen: %s does not match its topic %s", message.step, topic)
            return
        with self._changed:
            self._messages[(holder, step)] = message
            self._changed.notify_all()

    def publish(self, step: str, data: bytes) -> None:
        message = KeygenMessage(bytes.fromhex(self.task[2:]), self.name, step, data)
        blob = message.signed(self.account, self.domain).encode()
        self._link.publish_retained_blob(self._topics.keygen(self.name, step), blob)

    def wait(self, step: str, addresses: Mapping[str, str]) -> dict[str, KeygenMessage]:
        """Every holder's message for ``step``, each signed by its address; ``ProtocolError``
        naming who is missing after the timeout, or whose message carries a forged signature."""
        deadline = time.monotonic() + self.timeout
        with self._changed:
            while True:
                found = {h: self._messages.get((h, step)) for h in addresses}
                missing = sorted(h for h, m in found.items() if m is None)
                if not missing:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(
                        f"key generation of task {self.task}: no {step} from "
                        f"{', '.join(missing)} within {self.timeout:g} s"
                    )
                self._changed.wait(min(left, 1.0))
        messages = {h: m for h, m in found.items() if m is not None}
        for holder, message in messages.items():
            message.verify(self.domain, addresses[holder])
        return messages


def publish_session(board: KeygenBoard, terms: KeygenTerms) -> None:
    """The owner's call to its guardians."""
    board.publish(SESSION, terms.encode())


def await_session(board: KeygenBoard, owner: str, owner_address: str) -> KeygenTerms:
    """A guardian's wait for the owner's call; it must name this guardian and its address."""
    message = board.wait(SESSION, {owner: owner_address})[owner]
    terms = KeygenTerms.decode(message.data)
    if terms.addresses.get(board.name, "").lower() != board.account.address.lower():
        raise ConfigError(
            f"the owner's key generation for task {board.task} does not name "
            f"{board.name} with address {board.account.address}"
        )
    return terms


def run_keygen_holder(
    board: KeygenBoard, terms: KeygenTerms, state: HolderState
) -> tuple[bytes, KeygenRecord]:
    """This holder's side of the whole protocol (module docstring); the collective public
    context and the signed record, both saved in ``state``."""
    addresses = terms.addresses
    me = board.name
    if me not in addresses:
        raise ConfigError(f"{me} is not one of the key holders {sorted(addresses)}")
    share = state.share(me, terms.profile)
    seed_share = state.seed(me)

    board.publish(SEED_COMMITMENT, seed_share.commitment)
    seed_commitments = _data(board.wait(SEED_COMMITMENT, addresses))
    board.publish(SEED_REVEAL, seed_share.value)
    reveals = _data(board.wait(SEED_REVEAL, addresses))
    seed = common_seed(seed_commitments, reveals)

    contribution = state.contribution(share, seed)
    board.publish(CONTRIBUTION_COMMITMENT, contribution_commitment(me, contribution))
    commitments = _data(board.wait(CONTRIBUTION_COMMITMENT, addresses))
    board.publish(CONTRIBUTION, contribution)
    contributions = _data(board.wait(CONTRIBUTION, addresses))
    for holder, blob in contributions.items():
        if contribution_commitment(holder, blob) != commitments[holder]:
            raise HeError(f"{holder}'s contribution does not open its commitment")

    profile = PROFILES[terms.profile]
    context = collective_public_context(profile, seed, contributions)
    names = tuple(sorted(addresses))
    transcript = KeygenTranscript(
        profile=terms.profile,
        holders=names,
        seed_commitments=tuple(seed_commitments[h] for h in names),
        seed_reveals=tuple(reveals[h] for h in names),
        contribution_commitments=tuple(commitments[h] for h in names),
        contributions=tuple(contributions[h] for h in names),
        context_hash=context_hash(context),
    )
    digest = transcript.digest()
    board.publish(TRANSCRIPT, digest)
    signed = board.wait(TRANSCRIPT, addresses)
    disagree = sorted(h for h, m in signed.items() if m.data != digest)
    if disagree:
        raise HeError(f"{', '.join(disagree)} signed another key-generation transcript")
    record = KeygenRecord(
        bytes.fromhex(board.task[2:]), terms, transcript, tuple(signed[h].signature for h in names)
    )
    state.save(record, context)
    log.info("keygen: %s holds its share of task %s's key (%d holders)", me, board.task, len(names))
    return context, record


def _data(messages: Mapping[str, KeygenMessage]) -> dict[str, bytes]:
    return {holder: message.data for holder, message in messages.items()}
