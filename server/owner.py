"""The task owner (model demander): keys, task, and the global model.

The owner is the only role holding the CKKS secret key. It decrypts nothing but a round's
aggregate, and only after checking that the aggregate is the one anchored on chain. The exact
decryption never leaves this process: values are rounded to ``RELEASE_DECIMALS`` before they
touch the released model, because an exact CKKS decryption published next to its ciphertext
lets anyone recover the secret key (Li and Micciancio, 2021).
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from eth_utils import keccak

from truscl.chain import ChainClient
from truscl.errors import ConfigError, ProtocolError
from truscl.files import write_atomically
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.accounting import rounds_within_budget, task_epsilon
from truscl.privacy.ckks import OwnerKeys, context_hash, decrypt
from truscl.systemd import Heartbeat
from truscl.task import TaskSpec
from truscl.wire import Reassembler, TaskTopics, envelope
from truscl.wire.model import model_bytes, model_from_bytes

log = logging.getLogger(__name__)

RELEASE_DECIMALS = 6
TICK_S = 1.0


class _Event(enum.Enum):
    CONNECTED = "connected"  # queued by the link on every (re)connection
    TICK = "tick"  # the loop's idle wake-up


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
    """The released models on the owner's disk.

    A model is written here before its hash goes on chain and before it is published, so an
    owner restarted at any point can finish a release it began (and never releases a round
    twice: the chain refuses a second hash for the same round).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, round_no: int, params: np.ndarray) -> None:
        write_atomically(self.folder / f"{round_no}.model", model_bytes(params))

    def all(self, n_params: int) -> dict[int, np.ndarray]:
        models = {}
        for path in self.folder.glob("*.model"):
            models[int(path.stem)] = model_from_bytes(path.read_bytes(), n_params)
        return dict(sorted(models.items()))


class TaskOwner:
    def __init__(
        self,
        *,
        keys: OwnerKeys,
        chain: ChainClient,
        broker: BrokerSettings,
        store: ModelStore | None = None,
        on_model: Callable[[int, np.ndarray], None] | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        if not keys.context.is_private():
            raise ProtocolError("the task owner needs the secret key")
        self.keys = keys
        self.chain = chain
        self.broker = broker
        self.store = store
        self.models: dict[int, np.ndarray] = {}
        self._on_model = on_model
        self._heartbeat = heartbeat
        self._spec: TaskSpec | None = None
        self._link: MqttLink | None = None
        self._inbox: queue.Queue[bytes | _Event | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="owner", daemon=True)

    @property
    def public_context(self) -> bytes:
        return self.keys.public_context_bytes()

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
        )
        self._connect(spec)
        self._release(0, np.asarray(initial, dtype=np.float64))
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
            self._release(round_no, params)
        self._worker.start()  # aggregates queued meanwhile are taken in turn from here on
        log.info("owner: task %s resumed at model %d", spec.task, max(self.models, default=-1))

    def _connect(self, spec: TaskSpec) -> None:
        self._spec = spec
        topics = TaskTopics(spec.task)
        self._link = MqttLink(
            f"truscl-owner-{spec.task[2:10]}",
            self.broker,
            on_message=lambda topic, payload: self._inbox.put(payload),
            subscriptions=[topics.aggregate],
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
        reassembler = Reassembler(max_message=self._spec.max_message)
        while True:
            try:
                payload = self._inbox.get(timeout=TICK_S)
            except queue.Empty:
                payload = _Event.TICK
            if payload is None:
                return
            if self._heartbeat is not None:
                self._heartbeat.beat()
            if payload is _Event.TICK:
                continue
            try:
                if payload is _Event.CONNECTED:
                    self._publish_task()
                    continue
                blob = reassembler.add("aggregator", payload)
                if blob is not None:
                    self._on_aggregate(blob)
            except ProtocolError as exc:
                log.warning("owner: rejected an aggregate: %s", exc)
            except Exception:
                log.exception("owner: unexpected failure on an aggregate")

    def _on_aggregate(self, blob: bytes) -> None:
        spec = self._spec
        assert spec is not None
        message = envelope.decode(blob, "aggregate", len(blob))
        round_no = message["round"]
        if round_no in self.models or round_no - 1 not in self.models:
            raise ProtocolError(f"aggregate for round {round_no} out of turn")
        anchor = self.chain.round_anchor(spec.task_id, round_no)
        if anchor is None:
            raise ProtocolError(f"round {round_no} is not anchored")
        if keccak(message["ciphertext"]) != anchor.aggregate_hash:
            raise ProtocolError(f"aggregate of round {round_no} is not the anchored one")
        if message["updates"] != anchor.updates or anchor.updates < 1:
            raise ProtocolError(f"round {round_no} counts {message['updates']} updates")
        total = decrypt(self.keys, message["ciphertext"], spec.n_params)
        mean_delta = np.round(total, RELEASE_DECIMALS) / anchor.updates
        self._release(round_no, self.models[round_no - 1] + mean_delta)

    def _release(self, round_no: int, params: np.ndarray) -> None:
        """Store, anchor the hash (once), publish: in that order, so a restart finishes it."""
        spec = self._spec
        assert spec is not None
        data = model_bytes(params)
        model_hash = keccak(data)
        if self.store is not None:
            self.store.put(round_no, params)
        anchored = self.chain.model_hash(spec.task_id, round_no)
        if anchored is None:
            self.chain.publish_model(spec.task_id, round_no, model_hash)
        elif anchored != model_hash:
            raise ProtocolError(f"model {round_no} on chain is not the one this owner stored")
        self.models[round_no] = params
        self._publish_model(round_no, data)
        log.info("owner: released model %d (%s)", round_no, model_hash.hex()[:16])
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
