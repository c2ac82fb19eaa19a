"""The task owner (model demander): keys, task, and the global model.

The owner is the only role holding the CKKS secret key. It decrypts nothing but a round's
aggregate, and only after checking that the aggregate is the one anchored on chain. The exact
decryption never leaves this process: values are rounded to ``RELEASE_DECIMALS`` before they
touch the released model, because an exact CKKS decryption published next to its ciphertext
lets anyone recover the secret key (Li and Micciancio, 2021).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import numpy as np
from eth_utils import keccak

from truscl.chain import ChainClient
from truscl.errors import ProtocolError
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.privacy.ckks import OwnerKeys, context_hash, decrypt
from truscl.task import TaskSpec
from truscl.wire import Reassembler, TaskTopics, envelope
from truscl.wire.model import model_bytes

log = logging.getLogger(__name__)

RELEASE_DECIMALS = 6


class TaskOwner:
    def __init__(
        self,
        *,
        keys: OwnerKeys,
        chain: ChainClient,
        broker: BrokerSettings,
        on_model: Callable[[int, np.ndarray], None] | None = None,
    ) -> None:
        if not keys.context.is_private():
            raise ProtocolError("the task owner needs the secret key")
        self.keys = keys
        self.chain = chain
        self.broker = broker
        self.models: dict[int, np.ndarray] = {}
        self._on_model = on_model
        self._spec: TaskSpec | None = None
        self._link: MqttLink | None = None
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
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
        self._spec = spec
        topics = TaskTopics(spec.task)
        tx = self.chain.create_task(
            spec.task_id, spec.hash(), bytes.fromhex(spec.context_hash[2:]), aggregator, spec.rounds
        )
        self._link = MqttLink(
            f"truscl-owner-{spec.task[2:10]}",
            self.broker,
            on_message=lambda topic, payload: self._inbox.put(payload),
            subscriptions=[topics.aggregate],
            max_message=spec.max_message,
        ).start()
        self._worker.start()
        self._link.publish(topics.spec, envelope.encode("spec", spec=spec.to_dict()), retain=True)
        self._link.publish_retained_blob(topics.context, self.public_context)
        self._release(0, np.asarray(initial, dtype=np.float64))
        log.info("owner: task %s created in %s", spec.task, tx)
        return tx

    def stop(self) -> None:
        self._inbox.put(None)
        if self._worker.is_alive():
            self._worker.join(10)
        if self._link is not None:
            self._link.close()

    def _run(self) -> None:
        assert self._spec is not None
        reassembler = Reassembler(max_message=self._spec.max_message)
        while (payload := self._inbox.get()) is not None:
            try:
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
        spec, link = self._spec, self._link
        assert spec is not None and link is not None
        data = model_bytes(params)
        model_hash = keccak(data)
        self.chain.publish_model(spec.task_id, round_no, model_hash)
        self.models[round_no] = params
        link.publish(
            TaskTopics(spec.task).model,
            envelope.encode("model", round=round_no, params=data, model_hash=model_hash),
            retain=True,
        )
        log.info("owner: released model %d (%s)", round_no, model_hash.hex()[:16])
        if self._on_model is not None:
            self._on_model(round_no, params)
