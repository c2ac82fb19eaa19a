"""The device agent: the MQTT, chain and disk work around the round logic of
:mod:`agent.rounds` and the update of :mod:`agent.contribution`.

Everything the device is told is checked against the chain before it is used: the task spec
and the HE public context by their on-chain hashes, the global model by the hash the owner
anchored, receipts by the aggregator's key the chain names, inclusion proofs by the contract.
The device spends privacy budget only through its :class:`PrivacyLedger`, charged before any
update exists and at most once per round whatever happens (the round's state in the state file
says so), and refuses to train once the task's budget would be exceeded or when its update
could no longer count. Updates wait in the :class:`Outbox` until the aggregator's receipt
arrives, and are published again (the same bytes) on every reconnection and while a receipt
is missing; a restart resumes every round from the state file.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import tenseal as ts

from truscl.agent.contribution import ROUND_SECRET_BYTES, UpdateInputs, data_root, make_update
from truscl.agent.health import SENSORS
from truscl.agent.litert import ModelRuntime
from truscl.agent.outbox import Outbox
from truscl.agent.output import OccupancyOutput
from truscl.agent.rounds import (
    Drop,
    Phase,
    Publish,
    RoundBook,
    RoundState,
    Step,
    Terms,
    Train,
)
from truscl.agent.sensors import Reading
from truscl.chain.reader import ChainReader
from truscl.errors import ConfigError, HeError, ProtocolError
from truscl.files import write_atomically
from truscl.hashing import keccak
from truscl.keyfile import read_secret, write_secret
from truscl.learning import missing_sensor
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.accounting import PrivacyLedger
from truscl.privacy.ckks import context_hash, load_context
from truscl.systemd import Heartbeat, worker_items
from truscl.task import MAX_MESSAGE_LIMIT, SPEC_MAX_BYTES, TaskSpec
from truscl.wire import (
    Domain,
    Reassembler,
    TaskTopics,
    UpdateRecord,
    envelope,
    verify_proof,
)
from truscl.wire.model import model_from_bytes
from truscl.wire.receipt import Receipt
from truscl.wire.signing import Signer

log = logging.getLogger(__name__)

TICK_S = 1.0
SPEC_FILE = "spec.cbor"  # the task's terms as last verified against the chain
LEDGER_FILE = "privacy-ledger.json"
OUTBOX_FILE = "outbox.sqlite"
_EVENT_CONNECTED = ("", b"connected")
_EVENT_TICK = ("", b"")


def check_inclusion(
    record: UpdateRecord | None, inclusion: dict[str, Any], counted_in: int = 0
) -> None:
    """Raise unless ``inclusion`` proves that our own update (``record``) is in the tree of
    the round it was made for, or of the round its receipt said counts it (``counted_in``).

    An aggregator that dropped our update could otherwise send another device's leaf and
    proof, or an interior node of the tree, and we would believe we had been counted.
    """
    round_no = inclusion["round"]
    if record is None or round_no not in (record.round, counted_in):
        raise ProtocolError(f"inclusion proof for round {round_no}, which we sent nothing to")
    if inclusion["leaf"] != record.leaf():
        raise ProtocolError(f"inclusion proof for round {round_no} is for another update")
    if not all(isinstance(p, bytes) and len(p) == 32 for p in inclusion["proof"]):
        raise ProtocolError(f"inclusion proof for round {round_no} is malformed")
    if not verify_proof(record.leaf(), inclusion["proof"], inclusion["root"]):
        raise ProtocolError(f"inclusion proof for round {round_no} does not verify")


class DeviceAgent:
    def __init__(
        self,
        *,
        account: Signer,
        task: str,
        chain: ChainReader,
        broker: BrokerSettings,
        workdir: Path,
        collect: Callable[[], list[Reading]],
        name: str | None = None,
        heartbeat: Heartbeat | None = None,
        clock: Callable[[], float] = time.time,
        runtime: ModelRuntime | None = None,
        output: OccupancyOutput | None = None,
        sensors: Collection[str] = SENSORS,
    ) -> None:
        """``sensors``: the parts this device has (its suite's), which a task's features and
        label must not need more than."""
        self.account = account
        self.sensors = frozenset(sensors)
        self.name = name or account.address[:10]
        self.topics = TaskTopics(task)
        self.task_id = bytes.fromhex(task[2:])
        self.chain = chain
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.workdir / OUTBOX_FILE)
        # Only the worker thread touches the book; the state file is what others read.
        self._book = RoundBook(
            self.outbox.rounds(), [(p.blob_id, p.round) for p in self.outbox.pending()]
        )
        self.ledger_path = self.workdir / LEDGER_FILE
        self.ledger = (  # 0600: how much a device contributed is its own business
            PrivacyLedger.load(self.ledger_path)
            if self.ledger_path.exists() or self.ledger_path.is_symlink()
            else PrivacyLedger()
        )
        self._clock = clock
        self._budget_spent = False
        self._waiting_for_data: int | None = None
        self._collect_new = collect
        self._runtime = runtime or ModelRuntime()  # trains (numpy or LiteRT)
        self._output = output  # shows the newest model's prediction of the newest reading
        self._heartbeat = heartbeat
        self._readings: deque[Reading] = deque()
        self._domain = Domain(chain.chain_id, chain.address)
        self._aggregator_address: str | None = None  # the task's, as the chain names it
        self._spec: TaskSpec | None = None
        self._refused_spec: TaskSpec | None = None  # a task this device cannot learn
        self._context: ts.Context | None = None
        self._context_digest: bytes | None = None  # of the context loaded, checked on chain
        self._context_chunks = Reassembler(max_message=MAX_MESSAGE_LIMIT)
        self._models: dict[int, bytes] = {}  # round -> parameters, checked against the chain
        self._lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"device-{self.name}", daemon=True)
        me = account.address
        self._link = MqttLink(
            f"truscl-device-{me.lower()}",
            broker,
            on_message=lambda topic, payload: self._inbox.put((topic, payload)),
            subscriptions=[
                self.topics.spec,
                f"{self.topics.context}/+",
                self.topics.model,
                self.topics.round,
                self.topics.receipts(me),
            ],
            on_connected=lambda: self._inbox.put(_EVENT_CONNECTED),
        )

    def epsilon(self) -> float:
        if self._spec is None:
            return 0.0
        with self._lock:
            return self.ledger.epsilon(self._spec.dp.delta)

    @property
    def models(self) -> tuple[int, ...]:
        """The rounds whose released model this device holds, checked against the chain."""
        with self._lock:
            return tuple(sorted(self._models))

    def rounds(self) -> list[RoundState]:
        """Every round's state, as the state file holds it (any thread may ask)."""
        return self.outbox.rounds()

    def start(self, broker_timeout: float | None = 10.0) -> DeviceAgent:
        """Start; ``broker_timeout=None`` does not wait for the broker (it may come later).
        Updates still without a receipt go out again, as the same bytes, once connected."""
        self._worker.start()
        self._link.start(broker_timeout)
        return self

    def stop(self) -> None:
        if not self._worker.is_alive():
            return
        self._inbox.put(None)
        self._worker.join(10)
        self._link.close()
        self.outbox.close()

    # -- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        # a tick: a round waiting for readings or a receipt is looked at
        for topic, payload in worker_items(self._inbox.get, self._heartbeat, TICK_S, _EVENT_TICK):
            try:
                self._dispatch(topic, payload)
            except (ProtocolError, HeError, ConfigError) as exc:
                log.warning("device %s: rejected a message on %s: %s", self.name, topic, exc)
            except Exception:
                log.exception("device %s: unexpected failure on %s", self.name, topic)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if (topic, payload) == _EVENT_CONNECTED:
            self._apply(self._book.connected(self._clock()))
        elif topic == self.topics.spec:
            self._on_spec(payload)
        elif topic.startswith(self.topics.context + "/"):
            self._on_context_chunk(payload)
        elif topic == self.topics.model:
            self._on_model(payload)
        elif topic == self.topics.round:
            self._on_round(payload)
        elif topic == self.topics.receipts(self.account.address):
            self._on_receipt(payload)
        if self._spec is not None:
            terms = Terms(self._spec.rounds, self._spec.late_updates)
            self._apply(self._book.tick(self._clock(), terms))
            self._show_occupancy(self._spec)

    def _show_occupancy(self, spec: TaskSpec) -> None:
        """Drive the output from the newest global model and the newest reading."""
        if self._output is None or not self._models:
            return
        window = self._window(spec.window)
        if window:
            newest = max(self._models)
            params = model_from_bytes(self._models[newest], spec.n_params)
            self._output.show(spec, newest, params, window[-1])

    def _apply(self, step: Step) -> None:
        """Write the step's states and drop from the outbox what it says to, in one commit;
        then carry out its other decisions (each may step further)."""
        drops = [decision.update_id for decision in step.decisions if isinstance(decision, Drop)]
        self.outbox.save(step.changed, drops)
        for decision in step.decisions:
            if isinstance(decision, Publish):
                self._publish(decision)
            elif isinstance(decision, Train):
                self._train(decision)

    def _publish(self, decision: Publish) -> None:
        pending = self.outbox.get(decision.update_id)
        if pending is None:
            return  # settled meanwhile
        sent = self._link.publish_blob(pending.topic, pending.blob, pending.blob_id)
        state = self._book.get(decision.round)
        if state is not None and state.phase == Phase.BUILT:
            log.info("device %s: round %d update sent (%d bytes)", self.name, pending.round, sent)
        else:
            log.info("device %s: republished its round %d update", self.name, pending.round)
        self._apply(self._book.sent(decision.round))

    def _on_spec(self, payload: bytes) -> None:
        spec = TaskSpec.from_dict(envelope.decode(payload, "spec", SPEC_MAX_BYTES)["spec"])
        if spec in (self._spec, self._refused_spec):
            return  # published again (an owner or broker restart): already checked
        if spec.hash() != self.chain.task(self.task_id).spec_hash:
            raise ProtocolError("task spec does not match its on-chain hash")
        lacking = missing_sensor(spec.features, spec.label, self.sensors)
        if lacking is not None:
            self._refused_spec = spec
            log.error(
                "device %s: refusing task %s: its %s %r needs the %s sensor, which this device "
                "does not have (it has %s); not contributing",
                self.name,
                spec.task,
                "label" if lacking[0] == spec.label else "feature",
                lacking[0],
                lacking[1],
                ", ".join(sorted(self.sensors)) or "none",
            )
            return
        self._spec = spec
        spec_file = self.workdir / SPEC_FILE
        if not spec_file.exists() or spec_file.read_bytes() != spec.encode():
            write_atomically(spec_file, spec.encode())  # for `truscl agent status`
        self._link.max_message = spec.max_message  # chunk updates as the aggregator expects
        self._complete_ledger(spec)

    def _complete_ledger(self, spec: TaskSpec) -> None:
        """Write the charges the state file records but the ledger lacks: the agent died
        between the two writes (the state file is written first, so none is ever lost)."""
        dp = spec.dp
        with self._lock:
            missing = sorted(
                s.ledger_index
                for s in self._book.states()
                if s.ledger_index is not None and s.ledger_index >= len(self.ledger.rounds)
            )
            if not missing:
                return
            if missing != list(
                range(len(self.ledger.rounds), len(self.ledger.rounds) + len(missing))
            ):
                raise ConfigError(f"the state file's charges {missing} do not follow the ledger")
            for index in missing:
                (state,) = (s for s in self._book.states() if s.ledger_index == index)
                rate = spec.sampling_rate_for(state.readings or spec.window)
                self.ledger.record(rate, dp.noise_multiplier, dp.local_steps)
            self.ledger.save(self.ledger_path)
        log.warning("device %s: wrote %d charge(s) the ledger had lost", self.name, len(missing))

    def _on_context_chunk(self, payload: bytes) -> None:
        blob = self._context_chunks.add("owner", payload)
        if blob is None:
            return
        digest = context_hash(blob)
        if digest == self._context_digest:
            return  # published again: loading 125 KB of keys per device costs seconds at scale
        if digest != self.chain.task(self.task_id).context_hash:
            raise HeError("HE context does not match its on-chain hash")
        self._context = load_context(blob)  # refuses a context carrying a secret key
        self._context_digest = digest

    def _on_model(self, payload: bytes) -> None:
        # bounded by the largest task's: the spec may not be known yet, and the hash is checked
        model = envelope.decode(payload, "model", MAX_MESSAGE_LIMIT)
        round_no, model_hash = model["round"], model["model_hash"]
        if keccak(model["params"]) != model_hash:
            raise ProtocolError(f"model {round_no} does not match its hash")
        if self.chain.model_hash(self.task_id, round_no) != model_hash:
            raise ProtocolError(f"model {round_no} is not the one anchored on chain")
        # Only the newest two are kept: the next round trains from the newest, a late update of
        # the round it closed from the one before, and no round from an older one.
        with self._lock:
            self._models[round_no] = model["params"]
            for old in sorted(self._models)[:-2]:
                del self._models[old]

    def _on_round(self, payload: bytes) -> None:
        announced = envelope.decode(payload, "round", 1024)
        step = self._book.announced(
            announced["round"], announced["model_hash"], announced["deadline"]
        )
        self._apply(step)
        for state in step.changed:
            if state.phase in (Phase.SKIPPED, Phase.ABANDONED):
                log.info("device %s: round %d %s", self.name, state.round, state.phase)

    def _on_receipt(self, payload: bytes) -> None:
        kind, message = envelope.decode_any(payload, ("receipt", "inclusion"), 64 * 1024)
        if kind == "receipt":
            self._on_signed_receipt(Receipt.decode(payload))
            return
        round_no, proof = message["round"], message["proof"]
        candidates = self._book.candidates(round_no)
        ours = next(
            (s for s in candidates if s.record is not None and s.record.leaf() == message["leaf"]),
            candidates[0] if candidates else None,
        )
        check_inclusion(ours.record if ours else None, message, ours.counted_in if ours else 0)
        assert ours is not None and ours.record is not None
        if not self.chain.verify_update(ours.record, proof, round_no):  # the counting round
            raise ProtocolError(f"round {round_no} root on chain does not include our update")
        self._apply(self._book.included(ours.round, message["anchor_tx"]))
        log.info("device %s: round %d update included on chain", self.name, ours.round)

    def _on_signed_receipt(self, receipt: Receipt) -> None:
        """Drop an update from the outbox only on a receipt the task's aggregator signed for
        one of our updates: anyone on the broker can write to our receipt topic."""
        if receipt.task != self.task_id or receipt.device_address != self.account.address:
            raise ProtocolError("a receipt for another task or device")
        receipt.verify(self._domain, self._aggregator())
        step = self._book.receipt(
            receipt.update, receipt.accepted, receipt.reason, receipt.counted_in
        )
        self._apply(step)
        if not step.decisions:
            return  # a repeat, or an update we no longer hold
        if receipt.accepted:
            log.info("device %s: round %d update accepted", self.name, receipt.round)
        else:
            log.warning(
                "device %s: round %d update rejected: %s", self.name, receipt.round, receipt.reason
            )

    def _aggregator(self) -> str:
        if self._aggregator_address is None:
            self._aggregator_address = self.chain.task(self.task_id).aggregator
        return self._aggregator_address

    def _train(self, decision: Train) -> None:
        """Charge (once) and build the round's update, if its model, the HE context and enough
        readings are here; otherwise a later tick tries again.

        A first build trains on every reading it has, up to the task's window, once it has the
        task's ``min_readings``, and is charged at that sampling rate; a rebuild after a restart
        trains on as many (the newest) as the round was charged for, so at the same rate.
        """
        spec, context = self._spec, self._context
        round_no = decision.round
        if self._budget_spent and decision.charge:
            self._apply(self._book.budget_spent(round_no))
            return
        if spec is None or context is None:
            return
        params = self._models.get(round_no - 1)
        if params is None or keccak(params) != decision.model_hash:
            return  # the model for this round has not arrived (or is not the announced one)
        dp = spec.dp
        window = self._window(spec.window)
        needed = spec.min_readings if decision.charge else decision.readings or spec.window
        if len(window) < needed:
            if self._waiting_for_data != round_no:
                self._waiting_for_data = round_no
                log.info(
                    "device %s: %d readings, round %d needs %d; it waits for more",
                    self.name,
                    len(window),
                    round_no,
                    needed,
                )
            return
        if not decision.charge:
            window = window[-needed:]
        rate = spec.sampling_rate_for(len(window))
        if decision.charge:
            with self._lock:
                projected = self.ledger.epsilon_if(
                    rate, dp.noise_multiplier, dp.local_steps, dp.delta
                )
            if projected > dp.epsilon_budget:
                # With a full window the rate is the lowest it can be: no later round fits.
                self._budget_spent = len(window) == spec.window
                self._apply(self._book.budget_spent(round_no))
                log.warning(
                    "device %s: privacy budget: epsilon would reach %.2f > %.2f on %d readings; "
                    "not contributing to round %d%s",
                    self.name,
                    projected,
                    dp.epsilon_budget,
                    len(window),
                    round_no,
                    " nor any later one" if self._budget_spent else "",
                )
                return
            # The state file first, then the ledger: a restart in between finds the charge in
            # the state file and completes the ledger, and never charges the round again.
            with self._lock:
                self._apply(self._book.charged(round_no, len(self.ledger.rounds), len(window)))
                self.ledger.record(rate, dp.noise_multiplier, dp.local_steps)
                self.ledger.save(self.ledger_path)
        else:
            log.info(
                "device %s: rebuilding round %d's update, already charged", self.name, round_no
            )
        with self._lock:
            spent = self.ledger.epsilon(dp.delta)
        inputs = UpdateInputs(
            round=round_no,
            params=model_from_bytes(params, spec.n_params),
            window=window,
            epsilon_spent=spent,
            data_root=self._data_root(round_no, window),
        )
        # No rng: make_update draws this round's noise from a fresh OS-seeded generator
        update = make_update(
            spec,
            inputs,
            context=context,
            account=self.account,
            domain=self._domain,
            train=self._runtime.trainer(spec),
        )
        blob = update.encode()
        step = self._book.built(round_no, update.ident, update.record(), self._clock())
        (state,) = step.changed
        self.outbox.build(state, self.topics.updates(self.account.address), blob)
        log.info("device %s: round %d update built (epsilon %.3f)", self.name, round_no, spent)
        self._apply(Step([], step.decisions))

    def _data_root(self, round_no: int, window: list[Reading]) -> bytes:
        """Merkle root of the readings trained on, each leaf salted with its own salt derived
        from a secret of this round (:func:`truscl.agent.contribution.data_root`).

        The root commits the device to its data (a later data-contribution proof reveals the
        salt of each leaf it is asked about, and that leaf's reading); without the salts,
        anyone holding a guess of the readings could confirm it from the root, outside the DP
        guarantee. The round secret is kept (0600) so that an update rebuilt after a restart
        commits to the same data the same way.
        """
        path = self.workdir / "data-salts" / f"round-{round_no}"
        if path.exists():  # a rebuilt update keeps the round's secret
            secret = read_secret(path)
        else:
            secret = secrets.token_bytes(ROUND_SECRET_BYTES)
            write_secret(path, secret)
        return data_root(secret, window)

    def _window(self, size: int) -> list[Reading]:
        """Take the readings made since the last round and keep the newest ``size``."""
        self._readings.extend(self._collect_new())
        while len(self._readings) > size:
            self._readings.popleft()
        return list(self._readings)
