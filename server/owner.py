"""The task owner (model demander): keys, task, and the global model.

In threshold mode (the default) the owner holds one share of the CKKS secret key and its key
guardians the others: it decrypts a round's aggregate only by combining its own partial
decryption with one from every guardian, each of which answers only for an aggregate anchored
on chain with at least the task's minimum cohort, once per round. In single-key mode it holds
the whole key. Either way it decrypts nothing but a round's anchored aggregate, and releases
nothing derived from it unless the decryption lies within the bounds the task's terms imply
(:mod:`truscl.privacy.release`): a crafted ciphertext that would make the decryption reveal
the key is refused, the refusal recorded on chain, and the previous model released again for
that round so that the task goes on. Values are also rounded to ``RELEASE_DECIMALS`` before
they touch the released model, because an exact CKKS decryption published next to its
ciphertext lets anyone recover the secret key (Li and Micciancio, 2021). The rounded mean
delta then moves the model through the task's server optimiser
(:mod:`truscl.learning.optimisers`), whose state is stored with each model.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from truscl import metrics
from truscl.chain import ChainClient
from truscl.errors import ChainError, ConfigError, HeError, ProtocolError, SignatureError
from truscl.files import write_atomically
from truscl.hashing import keccak
from truscl.keyfile import read_secret, write_secret
from truscl.learning import OptimiserState, server_step
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.accounting import rounds_within_budget, task_epsilon
from truscl.privacy.ckks import OwnerKeys, context_hash, load_context
from truscl.privacy.release import Refusal, ReleaseBounds, noise_slack
from truscl.privacy.threshold import KeyShare, PartialDecryption, combine_slots, profile_of
from truscl.server.config import OWNER_HOLDER
from truscl.systemd import Heartbeat, worker_items
from truscl.task import TaskSpec
from truscl.wire import Reassembler, TaskTopics, envelope
from truscl.wire.keyholders import MAX_KEYHOLDER_MESSAGE, PartialMessage
from truscl.wire.model import model_bytes, model_from_bytes
from truscl.wire.signing import Domain

log = logging.getLogger(__name__)

RELEASE_DECIMALS = 6
TICK_S = 1.0


class _Event(enum.Enum):
    CONNECTED = "connected"  # queued by the link on every (re)connection
    TICK = "tick"  # the loop's idle wake-up


def next_model(
    spec: TaskSpec,
    previous: np.ndarray,
    state: OptimiserState,
    total: np.ndarray,
    updates: int,
) -> tuple[np.ndarray, OptimiserState]:
    """The model a round releases, and the optimiser's next state, from the decrypted sum of
    its ``updates`` deltas: rounded first (nothing exact is released), averaged, then stepped
    by the task's server optimiser from the previous model."""
    mean_delta = np.round(total, RELEASE_DECIMALS) / updates
    return server_step(spec.optimiser, previous, mean_delta, state)


def task_privacy(spec: TaskSpec) -> float:
    """Epsilon all of the task's rounds spend of a device's privacy, under the accountant the
    devices use; ``ConfigError`` with the figures when that exceeds the task's budget, so that
    no task asks devices for rounds their budget cannot pay for."""
    dp = spec.dp
    epsilon = task_epsilon(
        spec.sampling_rate, dp.noise_multiplier, dp.local_steps, spec.rounds, dp.delta
    )
    if epsilon > dp.epsilon_budget:
        allowed = rounds_within_budget(
            spec.sampling_rate, dp.noise_multiplier, dp.local_steps, dp.delta, dp.epsilon_budget
        )
        raise ConfigError(
            f"{spec.rounds} rounds would spend epsilon {epsilon:.3f} of each device's privacy "
            f"(RDP, delta {dp.delta:g}), over the budget {dp.epsilon_budget:g}: "
            f"the budget allows at most {allowed} rounds"
        )
    return epsilon


class ModelStore:
    """The released models on the owner's disk, each with the server optimiser's state after it.

    A model is written here before its hash goes on chain and before it is published, so an
    owner restarted at any point can finish a release it began (and never releases a round
    twice: the chain refuses a second hash for the same round). The optimiser's state is
    written before its model, so a stored model always has its state, and a restarted owner
    steps on from the very state an uninterrupted one would.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, round_no: int, params: np.ndarray, state: OptimiserState) -> None:
        write_atomically(self.folder / f"{round_no}.optimiser", state.to_bytes())
        write_atomically(self.folder / f"{round_no}.model", model_bytes(params))

    def state(self, round_no: int) -> OptimiserState:
        """The optimiser's state after model ``round_no``."""
        path = self.folder / f"{round_no}.optimiser"
        if not path.exists():
            raise ProtocolError(f"model {round_no} is stored without its optimiser state")
        return OptimiserState.from_bytes(path.read_bytes())

    def partial_path(self, round_no: int) -> Path:
        """Where the owner keeps its own partial decryption of a round (0600)."""
        return self.folder.parent / "partials" / f"{round_no}.partial"

    def all(self, n_params: int) -> dict[int, np.ndarray]:
        models = {}
        for path in self.folder.glob("*.model"):
            models[int(path.stem)] = model_from_bytes(path.read_bytes(), n_params)
        return dict(sorted(models.items()))


@dataclass(frozen=True)
class HeKeys:
    """What the owner decrypts with: its share of the secret key (in single-key mode the whole
    key, as a one-holder share), the task's public context, and the guardians (name to
    address) whose partial decryptions it needs: none in single-key mode."""

    share: KeyShare
    public_context: bytes
    guardians: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def single_key(cls, keys: OwnerKeys) -> HeKeys:
        return cls(KeyShare.from_context(OWNER_HOLDER, keys.context), keys.public_context_bytes())

    @property
    def holders(self) -> list[str]:
        return sorted([self.share.holder_id, *self.guardians])


@dataclass
class _Pending:
    """A round whose aggregate passed the owner's checks, waiting for the guardians' partials."""

    message: dict[str, Any]
    updates: int
    partials: dict[str, PartialDecryption]


class TaskOwner:
    def __init__(
        self,
        *,
        keys: OwnerKeys | HeKeys,
        chain: ChainClient,
        broker: BrokerSettings,
        store: ModelStore | None = None,
        on_model: Callable[[int, np.ndarray], None] | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.keys = keys if isinstance(keys, HeKeys) else HeKeys.single_key(keys)
        self._context = load_context(self.keys.public_context)
        self.chain = chain
        self.broker = broker
        self.store = store
        self.models: dict[int, np.ndarray] = {}
        self.states: dict[int, OptimiserState] = {}  # the server optimiser's, after each model
        self.refusals: collections.Counter[str] = collections.Counter()
        self._on_model = on_model
        self._heartbeat = heartbeat
        self._spec: TaskSpec | None = None
        self._domain: Domain | None = None
        self._link: MqttLink | None = None
        self._pending: dict[int, _Pending] = {}
        self._partials: dict[str, PartialMessage] = {}  # each guardian's latest
        self._inbox: queue.Queue[tuple[str, bytes] | _Event | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="owner", daemon=True)

    @property
    def public_context(self) -> bytes:
        return self.keys.public_context

    @property
    def context_hash(self) -> str:
        return "0x" + context_hash(self.public_context).hex()

    def create_task(self, spec: TaskSpec, aggregator: str, initial: np.ndarray) -> str:
        """Anchor the spec and the context on chain, publish them and the initial model."""
        if spec.context_hash != self.context_hash:
            raise ProtocolError("the spec names another HE context than the owner's")
        epsilon = task_privacy(spec)
        tx = self.chain.create_task(
            spec.task_id,
            spec.hash(),
            bytes.fromhex(spec.context_hash[2:]),
            aggregator,
            spec.rounds,
            epsilon_micros=math.ceil(epsilon * 1e6),
            budget_micros=math.floor(spec.dp.epsilon_budget * 1e6),
            min_cohort=spec.min_cohort,
        )
        self._connect(spec)
        self._release(0, np.asarray(initial, dtype=np.float64), OptimiserState())
        self._worker.start()
        log.info("owner: task %s created in %s", spec.task, tx)
        return tx

    def resume(self, spec: TaskSpec) -> None:
        """Take up a task created earlier: the chain must hold this spec and this key's context.

        Models stored but not yet anchored (a release cut short) are anchored and published now;
        the spec, the context and the latest model are published again (retained), so a broker
        that lost them has them back.
        """
        record = self.chain.task(spec.task_id)
        if record.spec_hash != spec.hash():
            raise ProtocolError(f"task {spec.task} on chain has another spec than the owner's")
        if "0x" + record.context_hash.hex() != self.context_hash:
            raise ProtocolError(f"task {spec.task} on chain names another HE context")
        if self.store is None:
            raise ProtocolError("resuming a task needs the owner's model store")
        self._connect(spec)
        for round_no, params in self.store.all(spec.n_params).items():
            self._release(round_no, params, self.store.state(round_no))
        self._finish_refusals(spec)
        self._worker.start()  # aggregates queued meanwhile are taken in turn from here on
        log.info("owner: task %s resumed at model %d", spec.task, max(self.models, default=-1))

    def _finish_refusals(self, spec: TaskSpec) -> None:
        """A round refused on chain whose model a stop cut short gets it now (the previous
        model again), or the task could never go on."""
        latest = max(self.models, default=None)
        if latest is None or latest >= spec.rounds:
            return
        if self.chain.round_refusal(spec.task_id, latest + 1):
            self._release(latest + 1, self.models[latest], self.states[latest])

    def _connect(self, spec: TaskSpec) -> None:
        if [h for h, _ in spec.key_holders] != (self.keys.holders if spec.key_holders else []):
            raise ProtocolError("the spec names other key holders than the owner's keys")
        self._spec = spec
        self._domain = Domain(self.chain.chain_id, self.chain.address)
        topics = TaskTopics(spec.task)
        subscriptions = [topics.aggregate]
        if self.keys.guardians:
            subscriptions.append(topics.all_partials)
        self._link = MqttLink(
            f"truscl-owner-{spec.task[2:10]}",
            self.broker,
            on_message=lambda topic, payload: self._inbox.put((topic, payload)),
            subscriptions=subscriptions,
            max_message=spec.max_message,
            on_connected=lambda: self._inbox.put(_Event.CONNECTED),
        ).start()

    def _publish_task(self) -> None:
        """Spec and public context, retained: on every (re)connection, which costs little and
        puts them back on a broker that restarted without its retained messages."""
        spec, link = self._spec, self._link
        if spec is None or link is None:
            return
        topics = TaskTopics(spec.task)
        link.publish(topics.spec, envelope.encode("spec", spec=spec.to_dict()), retain=True)
        link.publish_retained_blob(topics.context, self.public_context)
        if self.models:
            latest = max(self.models)
            self._publish_model(latest, model_bytes(self.models[latest]))

    def stop(self) -> None:
        self._inbox.put(None)
        if self._worker.is_alive():
            self._worker.join(10)
        if self._link is not None:
            self._link.close()

    def _run(self) -> None:
        assert self._spec is not None
        reassembler = Reassembler(
            max_message=self._spec.max_message, max_blob=MAX_KEYHOLDER_MESSAGE
        )
        aggregate_topic = TaskTopics(self._spec.task).aggregate
        items: Iterator[tuple[str, bytes] | _Event] = worker_items(
            self._inbox.get, self._heartbeat, TICK_S, _Event.TICK
        )
        for payload in items:
            if payload is _Event.TICK:
                continue
            try:
                if payload is _Event.CONNECTED:
                    self._publish_task()
                    continue
                topic, data = payload
                if topic == aggregate_topic:
                    blob = reassembler.add("aggregator", data)
                    if blob is not None:
                        self._on_aggregate(blob)
                else:  # .../partials/<holder>/<chunk>
                    blob = reassembler.add(topic.rsplit("/", 1)[0], data)
                    if blob is not None:
                        self._on_partial(blob)
            except ProtocolError as exc:
                log.warning("owner: rejected a message: %s", exc)
            except Exception:
                log.exception("owner: unexpected failure on a message")

    def _on_aggregate(self, blob: bytes) -> None:
        spec = self._spec
        assert spec is not None
        message = envelope.decode(blob, "aggregate", len(blob))
        round_no = message["round"]
        if round_no in self._pending or round_no in self.models:
            return  # sent again for a key holder that missed it: this one has it
        if round_no - 1 not in self.models:
            raise ProtocolError(f"aggregate for round {round_no} out of turn")
        anchor = self.chain.round_anchor(spec.task_id, round_no)
        if anchor is None:
            raise ProtocolError(f"round {round_no} is not anchored")
        if keccak(message["ciphertext"]) != anchor.aggregate_hash:
            raise ProtocolError(f"aggregate of round {round_no} is not the anchored one")
        if message["updates"] != anchor.updates or anchor.updates < 1:
            raise ProtocolError(f"round {round_no} counts {message['updates']} updates")
        if anchor.updates < spec.min_cohort:
            self._refuse(round_no, Refusal.UNDER_COHORT)
            return
        own = self._own_partial(round_no, message["ciphertext"])
        self._pending[round_no] = _Pending(message, anchor.updates, {own.holder_id: own})
        self._try_release(round_no)

    def _own_partial(self, round_no: int, ciphertext: bytes) -> PartialDecryption:
        """The owner's share applied to a round's aggregate: once per round, like every holder.
        Kept in the state folder (0600: as sensitive as the share), so that an owner restarted
        while it waited for the guardians reuses it rather than decrypting the round again."""
        spec = self._spec
        assert spec is not None
        path = None if self.store is None else self.store.partial_path(round_no)
        if path is not None and path.exists():
            kept = PartialDecryption.from_bytes(read_secret(path))
            if kept.ciphertext_hash != keccak(ciphertext):
                raise ProtocolError(f"round {round_no} was decrypted for another aggregate")
            return kept
        partial = self.keys.share.partial_decrypt(self._context, ciphertext, spec.n_params)
        if path is not None:
            write_secret(path, partial.to_bytes())
        return partial

    def _on_partial(self, blob: bytes) -> None:
        """A guardian's partial decryption: kept if it is signed by that guardian for this
        task; it counts for the round whose anchored aggregate it names."""
        spec, domain = self._spec, self._domain
        assert spec is not None and domain is not None
        partial = PartialMessage.decode(blob)
        address = self.keys.guardians.get(partial.holder)
        if address is None or partial.task != spec.task_id:
            raise ProtocolError(f"a partial from {partial.holder!r} for another task or holder")
        try:
            partial.verify(domain, address)
        except SignatureError as exc:
            raise ProtocolError(str(exc)) from None
        self._partials[partial.holder] = partial
        if partial.round in self._pending:
            self._try_release(partial.round)

    def _try_release(self, round_no: int) -> None:
        """Combine once every holder's partial for this aggregate is in; release the model if
        the decryption is within the task's bounds, else refuse the round."""
        spec, pending = self._spec, self._pending[round_no]
        assert spec is not None
        digest = keccak(pending.message["ciphertext"])
        for holder, message in self._partials.items():
            if message.round == round_no and message.aggregate == digest:
                try:
                    pending.partials[holder] = PartialDecryption.from_bytes(message.partial)
                except HeError as exc:
                    log.warning("owner: %s's partial for round %d: %s", holder, round_no, exc)
        missing = sorted(set(self.keys.holders) - set(pending.partials))
        if missing:
            log.info("owner: round %d waits for %s", round_no, ", ".join(missing))
            return
        del self._pending[round_no]
        try:
            slots = combine_slots(
                self._context,
                pending.message["ciphertext"],
                spec.n_params,
                list(pending.partials.values()),
                self.keys.holders,
            )
        except HeError as exc:
            log.warning("owner: round %d does not decrypt: %s", round_no, exc)
            self._refuse(round_no, Refusal.UNDECRYPTABLE)
            return
        bounds = ReleaseBounds(
            n_params=spec.n_params,
            updates=pending.updates,
            update_clip=spec.dp.update_clip,
            slack=noise_slack(profile_of(self._context), len(self.keys.holders)),
        )
        refusal = bounds.check(slots)
        if refusal is not None:
            self._refuse(round_no, refusal)
            return
        params, state = next_model(
            spec,
            self.models[round_no - 1],
            self.states[round_no - 1],
            slots.reshape(-1)[: spec.n_params],
            pending.updates,
        )
        self._release(round_no, params, state)

    def _refuse(self, round_no: int, reason: Refusal) -> None:
        """Record on chain that nothing derived from this round's decryption is released, then
        release the previous model again under this round's number (the contract accepts no
        other), so that the aggregator opens the next round on it; the optimiser's state stays
        as it was too, since the round brought no step. Nothing about the decrypted values is
        logged."""
        spec = self._spec
        assert spec is not None
        self.refusals[reason.name.lower()] += 1
        metrics.ROUNDS_REFUSED.inc()
        log.warning(
            "owner: refused round %d (%s); %d round(s) refused so far",
            round_no,
            reason.name.lower(),
            sum(self.refusals.values()),
        )
        if self.chain.round_refusal(spec.task_id, round_no) == 0:
            self.chain.refuse_round(spec.task_id, round_no, int(reason))
        self._release(round_no, self.models[round_no - 1], self.states[round_no - 1])

    def _release(self, round_no: int, params: np.ndarray, state: OptimiserState) -> None:
        """Store, anchor the hash (once), publish: in that order, so a restart finishes it."""
        spec = self._spec
        assert spec is not None
        data = model_bytes(params)
        model_hash = keccak(data)
        if self.store is not None:
            self.store.put(round_no, params, state)
        anchored = self.chain.model_hash(spec.task_id, round_no)
        if anchored is None:
            metrics.ANCHOR_ATTEMPTS.labels("model").inc()
            with metrics.ANCHOR_FAILURES.labels("model").count_exceptions(ChainError):
                self.chain.publish_model(spec.task_id, round_no, model_hash)
        elif anchored != model_hash:
            raise ProtocolError(f"model {round_no} on chain is not the one this owner stored")
        self.models[round_no] = params
        self.states[round_no] = state
        self._publish_model(round_no, data)
        log.info("owner: released model %d (%s)", round_no, model_hash.hex()[:16])
        metrics.MODELS_RELEASED.inc()
        if self._on_model is not None:
            self._on_model(round_no, params)

    def _publish_model(self, round_no: int, data: bytes) -> None:
        spec, link = self._spec, self._link
        assert spec is not None and link is not None
        link.publish(
            TaskTopics(spec.task).model,
            envelope.encode("model", round=round_no, params=data, model_hash=keccak(data)),
            retain=True,
        )
