"""The device agent: sense, train privately, encrypt, sign, publish, and keep it until acked.

Everything the device is told is checked against the chain before it is used: the task spec
and the HE public context by their on-chain hashes, the global model by the hash the owner
anchored. The device spends privacy budget only through its :class:`PrivacyLedger`, which is
written to disk before the update leaves, and refuses to train once the task's budget would be
exceeded. Updates wait in the :class:`Outbox` until the aggregator's receipt arrives.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from truscl.agent.outbox import Outbox
from truscl.agent.sensors import Reading
from truscl.chain import ChainClient
from truscl.errors import ConfigError, HeError, ProtocolError
from truscl.files import write_atomically
from truscl.keyfile import read_secret, write_secret
from truscl.learning import LogisticModel
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.accounting import PrivacyLedger
from truscl.privacy.ckks import context_hash, encrypt, load_context
from truscl.privacy.dp import DpSgdConfig, clip_by_l2, dp_sgd, secure_generator
from truscl.systemd import Heartbeat
from truscl.task import MAX_MESSAGE_LIMIT, SPEC_MAX_BYTES, TaskSpec
from truscl.wire import (
    Domain,
    Reassembler,
    TaskTopics,
    Update,
    UpdateRecord,
    envelope,
    merkle_root,
    verify_proof,
)
from truscl.wire.model import model_from_bytes
from truscl.wire.receipt import Receipt

log = logging.getLogger(__name__)

TICK_S = 1.0
SPEC_FILE = "spec.cbor"  # the task's terms as last verified against the chain
LEDGER_FILE = "privacy-ledger.json"
OUTBOX_FILE = "outbox.sqlite"
_EVENT_CONNECTED = ("", b"connected")
_EVENT_TICK = ("", b"")


def check_inclusion(record: UpdateRecord | None, inclusion: dict[str, Any]) -> None:
    """Raise unless ``inclusion`` proves that our own update (``record``) is in the tree.

    An aggregator that dropped our update could otherwise send another device's leaf and
    proof, or an interior node of the tree, and we would believe we had been counted.
    """
    round_no = inclusion["round"]
    if record is None or record.round != round_no:
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
        account: LocalAccount,
        task: str,
        chain: ChainClient,
        broker: BrokerSettings,
        workdir: Path,
        collect: Callable[[], list[Reading]],
        name: str | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.account = account
        self.name = name or account.address[:10]
        self.topics = TaskTopics(task)
        self.task_id = bytes.fromhex(task[2:])
        self.chain = chain
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.workdir / OUTBOX_FILE)
        self.ledger_path = self.workdir / LEDGER_FILE
        self.ledger = (
            PrivacyLedger.from_json(self.ledger_path.read_text())
            if self.ledger_path.exists()
            else PrivacyLedger()
        )
        self.contributed: set[int] = set()
        self._sent: dict[int, UpdateRecord] = {}  # what each round's inclusion proof must prove
        self.included: dict[int, str] = {}  # round -> anchor tx of a verified inclusion proof
        self.budget_spent = False
        self._waiting_for_data: int | None = None
        self._collect_new = collect
        self._heartbeat = heartbeat
        self._readings: deque[Reading] = deque()
        self._rng = secure_generator()
        self._domain = Domain(chain.chain_id, chain.address)
        self._aggregator_address: str | None = None  # the task's, as the chain names it
        self._spec: TaskSpec | None = None
        self._context: ts.Context | None = None
        self._context_chunks = Reassembler(max_message=MAX_MESSAGE_LIMIT)
        self._models: dict[int, bytes] = {}  # round -> parameters, checked against the chain
        self._announced: tuple[int, bytes] | None = None
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

    def start(self, broker_timeout: float | None = 10.0) -> DeviceAgent:
        """Start; ``broker_timeout=None`` does not wait for the broker (it may come later)."""
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
        while True:
            try:
                item = self._inbox.get(timeout=TICK_S)
            except queue.Empty:
                item = _EVENT_TICK  # a round waiting for readings is tried again
            if item is None:
                return
            if self._heartbeat is not None:
                self._heartbeat.beat()
            topic, payload = item
            try:
                self._dispatch(topic, payload)
            except (ProtocolError, HeError, ConfigError) as exc:
                log.warning("device %s: rejected a message on %s: %s", self.name, topic, exc)
            except Exception:
                log.exception("device %s: unexpected failure on %s", self.name, topic)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if (topic, payload) == _EVENT_CONNECTED:
            self._republish()
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
        self._maybe_contribute()

    def _republish(self) -> None:
        for pending in self.outbox.pending():
            self._link.publish_blob(pending.topic, pending.blob)
            log.info("device %s: republished its round %d update", self.name, pending.round)

    def _on_spec(self, payload: bytes) -> None:
        spec = TaskSpec.from_dict(envelope.decode(payload, "spec", SPEC_MAX_BYTES)["spec"])
        if spec.hash() != self.chain.task(self.task_id).spec_hash:
            raise ProtocolError("task spec does not match its on-chain hash")
        self._spec = spec
        spec_file = self.workdir / SPEC_FILE
        if not spec_file.exists() or spec_file.read_bytes() != spec.encode():
            write_atomically(spec_file, spec.encode())  # for `truscl agent status`
        self._link.max_message = spec.max_message  # chunk updates as the aggregator expects

    def _on_context_chunk(self, payload: bytes) -> None:
        blob = self._context_chunks.add("owner", payload)
        if blob is None:
            return
        if context_hash(blob) != self.chain.task(self.task_id).context_hash:
            raise HeError("HE context does not match its on-chain hash")
        self._context = load_context(blob)  # refuses a context carrying a secret key

    def _on_model(self, payload: bytes) -> None:
        model = envelope.decode(payload, "model", SPEC_MAX_BYTES)
        round_no, model_hash = model["round"], model["model_hash"]
        if keccak(model["params"]) != model_hash:
            raise ProtocolError(f"model {round_no} does not match its hash")
        if self.chain.model_hash(self.task_id, round_no) != model_hash:
            raise ProtocolError(f"model {round_no} is not the one anchored on chain")
        self._models[round_no] = model["params"]

    def _on_round(self, payload: bytes) -> None:
        announced = envelope.decode(payload, "round", 1024)
        self._announced = (announced["round"], announced["model_hash"])

    def _on_receipt(self, payload: bytes) -> None:
        kind, message = envelope.decode_any(payload, ("receipt", "inclusion"), 64 * 1024)
        if kind == "receipt":
            self._on_signed_receipt(Receipt.decode(payload))
            return
        round_no, proof = message["round"], message["proof"]
        record = self._sent.get(round_no)
        check_inclusion(record, message)
        assert record is not None
        if not self.chain.verify_update(record, proof):
            raise ProtocolError(f"round {round_no} root on chain does not include our update")
        self.included[round_no] = message["anchor_tx"]
        log.info("device %s: round %d update included on chain", self.name, round_no)

    def _on_signed_receipt(self, receipt: Receipt) -> None:
        """Drop an update from the outbox only on a receipt the task's aggregator signed for
        one of our updates: anyone on the broker can write to our receipt topic."""
        if receipt.task != self.task_id or receipt.device_address != self.account.address:
            raise ProtocolError("a receipt for another task or device")
        receipt.verify(self._domain, self._aggregator())
        if not self.outbox.remove(receipt.update):
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

    def _maybe_contribute(self) -> None:
        if self._announced is None or self._spec is None or self._context is None:
            return
        round_no, model_hash = self._announced
        if round_no in self.contributed or self.budget_spent:
            return
        params = self._models.get(round_no - 1)
        if params is None or keccak(params) != model_hash:
            return  # the model for this round has not arrived (or is not the announced one)
        if self._contribute(round_no, model_from_bytes(params, self._spec.n_params)):
            self.contributed.add(round_no)

    def _contribute(self, round_no: int, params: np.ndarray) -> bool:
        """Train and send this round's update; False if the window is not full yet."""
        spec, context = self._spec, self._context
        assert spec is not None and context is not None
        dp = spec.dp
        q = spec.sampling_rate
        with self._lock:
            projected = self.ledger.epsilon_if(q, dp.noise_multiplier, dp.local_steps, dp.delta)
        if projected > dp.epsilon_budget:
            self.budget_spent = True
            log.warning(
                "device %s: privacy budget spent (epsilon would reach %.2f > %.2f); "
                "not contributing from round %d on",
                self.name,
                projected,
                dp.epsilon_budget,
                round_no,
            )
            return True
        window = self._window(spec.window)
        if len(window) < spec.window:  # the sampling rate assumes a full window
            if self._waiting_for_data != round_no:
                self._waiting_for_data = round_no
                log.info(
                    "device %s: %d of %d readings in the window; round %d waits for more",
                    self.name,
                    len(window),
                    spec.window,
                    round_no,
                )
            return False
        # One attempt per round from here: whatever fails below, the budget is charged once,
        # and it is charged (durably) before anything derived from the data exists.
        self.contributed.add(round_no)
        with self._lock:
            self.ledger.record(q, dp.noise_multiplier, dp.local_steps)
            write_atomically(self.ledger_path, self.ledger.to_json().encode())
            spent = self.ledger.epsilon(dp.delta)
        model = LogisticModel(len(spec.features))
        X = spec.scaler.apply(np.array([r.features() for r in window]))
        y = np.array([r.label() for r in window], dtype=np.float64)
        config = DpSgdConfig(
            clip_norm=dp.clip_norm,
            noise_multiplier=dp.noise_multiplier,
            sampling_rate=q,
            steps=dp.local_steps,
            learning_rate=dp.learning_rate,
        )
        trained = dp_sgd(model, params, X, y, config, self._rng)
        delta = clip_by_l2(trained - params, dp.update_clip)
        update = Update(
            task=self.task_id,
            round=round_no,
            device=bytes.fromhex(self.account.address[2:]),
            ciphertext=encrypt(context, delta),
            context=bytes.fromhex(spec.context_hash[2:]),
            samples=len(window),
            epsilon_micros=round(spent * 1e6),
            data_root=self._data_root(round_no, window),
        ).signed(self.account, self._domain)
        blob = update.encode()
        topic = self.topics.updates(self.account.address)
        self.outbox.put(round_no, topic, blob)
        self._sent[round_no] = update.record()
        sent = self._link.publish_blob(topic, blob)
        log.info(
            "device %s: round %d update sent (%d bytes, epsilon %.3f)",
            self.name,
            round_no,
            sent,
            spent,
        )
        return True

    def _data_root(self, round_no: int, window: list[Reading]) -> bytes:
        """Merkle root of the readings trained on, each leaf salted with a secret of this round.

        The root commits the device to its data (a later data-contribution proof reveals the
        salt and the readings it is asked about); without the salt, anyone holding a guess of
        the readings could confirm it from the root, outside the DP guarantee.
        """
        path = self.workdir / "data-salts" / f"round-{round_no}"
        if path.exists():  # a restart within the round: the commitment keeps its salt
            salt = read_secret(path)
        else:
            salt = secrets.token_bytes(32)
            write_secret(path, salt)
        return merkle_root([keccak(salt + r.encode()) for r in window])

    def _window(self, size: int) -> list[Reading]:
        """Take the readings made since the last round and keep the newest ``size``."""
        self._readings.extend(self._collect_new())
        while len(self._readings) > size:
            self._readings.popleft()
        return list(self._readings)
