"""``truscl owner init`` and ``truscl owner run``: the task owner as a service.

``init`` makes the task's HE keys (in threshold mode, by distributed key generation with the
guardians named in ``owner.toml``, who run ``truscl guardian init`` for the same task at the
same time), creates the task on chain from the task file and publishes its spec, public context
and initial model. ``run`` takes the task up from the owner's state folder and the chain,
however often it is restarted, and releases a model for every anchored aggregate whose
decryption is within bounds. The state folder holds the HE secret key or the owner's share of
it (0600): it never leaves the owner.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from truscl import metrics
from truscl.chain import ChainClient
from truscl.chain.rpc import connect
from truscl.errors import ChainError, ConfigError
from truscl.files import write_atomically
from truscl.keyfile import load_account
from truscl.privacy.accounting import rounds_within_budget
from truscl.privacy.ckks import PROFILES, OwnerKeys, context_hash
from truscl.server.config import OWNER_HOLDER, OwnerConfig
from truscl.server.keygen import (
    HolderState,
    KeygenBoard,
    KeygenTerms,
    publish_session,
    run_keygen_holder,
)
from truscl.server.owner import HeKeys, ModelStore, TaskOwner, task_privacy
from truscl.systemd import Heartbeat, supervise
from truscl.task import TaskSpec, load_task_file
from truscl.wire.signing import Domain

log = logging.getLogger(__name__)

UNBOUND_CONTEXT = "0x" + "00" * 32  # a task file's spec before its HE keys exist


class OwnerState:
    """The owner's folder: HE secret key (single-key) or key share and keygen record
    (threshold), the task's spec, its creation record, models, its partial decryptions."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.he_key = self.folder / "he-secret-context"
        self.spec_file = self.folder / "spec.cbor"
        self.record_file = self.folder / "task.json"
        self.models = self.folder / "models"

    def spec(self) -> TaskSpec | None:
        return TaskSpec.decode(self.spec_file.read_bytes()) if self.spec_file.exists() else None

    def save_spec(self, spec: TaskSpec) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.spec_file, spec.encode())

    def record(self) -> dict[str, str] | None:
        if not self.record_file.exists():
            return None
        record: dict[str, str] = json.loads(self.record_file.read_text())
        return record

    def save_record(self, record: dict[str, str]) -> None:
        write_atomically(self.record_file, (json.dumps(record, indent=1) + "\n").encode())

    def keys(self, profile: str) -> OwnerKeys:
        """The task's HE keys: made once, then read back (a retried init reuses them)."""
        if self.he_key.exists():
            return OwnerKeys.load(self.he_key)
        keys = OwnerKeys.generate(PROFILES[profile])
        keys.save(self.he_key)
        return keys

    @property
    def holder(self) -> HolderState:
        """The owner's key-holder files (threshold mode), in the same folder."""
        return HolderState(self.folder)

    def he_keys(self, spec: TaskSpec) -> HeKeys:
        """What ``owner run`` decrypts with, in the task's mode."""
        if spec.he_mode == "single-key":
            return HeKeys.single_key(OwnerKeys.load(self.he_key))
        holder = self.holder
        return HeKeys(
            share=holder.share(OWNER_HOLDER, spec.he_profile),
            public_context=holder.public_context(),
            guardians={n: a for n, a in spec.key_holders if n != OWNER_HOLDER},
        )


def owner_client(config: OwnerConfig) -> ChainClient:
    account = load_account(config.key)
    return ChainClient.at(connect(config.chain.rpc), config.chain.contract, account)


def init_task(config: OwnerConfig) -> TaskSpec:
    """Create the task once. A run cut short after the task went on chain is finished by
    running it again (the spec and keys on disk are reused); before that, running it again
    takes the task file as it is now (a task refused for its budget can be fixed and retried).
    """
    state = OwnerState(config.state)
    record = state.record()
    if record is not None:
        raise ConfigError(
            f"{state.folder} already holds task {record['task']}; `truscl owner run` takes it up"
        )
    chain = owner_client(config)
    spec = state.spec()
    if spec is None or not _task_exists(chain, spec):
        task = spec.task if spec is not None else config.task or "0x" + os.urandom(32).hex()
        draft = load_task_file(config.task_file, task=task, context_hash=UNBOUND_CONTEXT)
        task_privacy(draft)  # refused with its figures before any key is made
        if config.he_mode == "single-key":
            keys = state.keys(draft.he_profile)
            public = keys.public_context_bytes()
            spec = replace(draft, context_hash="0x" + context_hash(public).hex())
        else:
            spec = _threshold_keygen(config, chain, draft)
        state.save_spec(spec)
    owner = TaskOwner(
        keys=state.he_keys(spec), chain=chain, broker=config.broker, store=ModelStore(state.models)
    )
    try:
        if _task_exists(chain, spec):
            owner.resume(spec)
        else:
            owner.create_task(spec, config.aggregator, initial_model(spec))
    finally:
        owner.stop()
    state.save_record({"task": spec.task, "spec_hash": "0x" + spec.hash().hex()})
    return spec


def initial_model(spec: TaskSpec) -> np.ndarray:
    """Model 0, from the task's model kind, drawn (for an mlp) from a seed the task id gives:
    the owner publishes it and anchors its hash, so nobody else needs to draw it."""
    return spec.make_model().init_params(seed=int.from_bytes(spec.task_id[:8], "big"))


def _threshold_keygen(config: OwnerConfig, chain: ChainClient, draft: TaskSpec) -> TaskSpec:
    """Run the key generation with the guardians (server/keygen.py); the spec it binds: the
    collective context's hash, the holders, and the digest of the transcript all signed."""
    account = load_account(config.key)
    holders = tuple(sorted(((OWNER_HOLDER, account.address), *config.guardians)))
    terms = KeygenTerms(draft.he_profile, holders)
    log.info("owner: key generation of task %s with %s", draft.task, ", ".join(dict(holders)))
    with KeygenBoard(
        task=draft.task,
        name=OWNER_HOLDER,
        account=account,
        domain=Domain(chain.chain_id, chain.address),
        broker=config.broker,
    ) as board:
        publish_session(board, terms)
        public, record = run_keygen_holder(board, terms, OwnerState(config.state).holder)
    return replace(
        draft,
        context_hash="0x" + context_hash(public).hex(),
        key_holders=tuple((name, address.lower()) for name, address in holders),
        keygen_digest="0x" + record.transcript.digest().hex(),
    )


def _task_exists(chain: ChainClient, spec: TaskSpec) -> bool:
    try:
        chain.task(spec.task_id)
    except ChainError as exc:
        if "UnknownTask" in str(exc):
            return False
        raise
    return True


def run_owner(config: OwnerConfig, stop: threading.Event) -> None:
    state = OwnerState(config.state)
    spec = state.spec()
    if spec is None or state.record() is None:
        raise ConfigError(f"{state.folder} holds no task yet: run `truscl owner init` first")
    heartbeat = Heartbeat("owner")
    owner = TaskOwner(
        keys=state.he_keys(spec),
        chain=owner_client(config),
        broker=config.broker,
        store=ModelStore(state.models),
        heartbeat=heartbeat,
    )
    owner.resume(spec)
    log.info("owner: serving task %s", spec.task)
    running = ExitStack()
    try:
        if config.metrics is not None:
            running.enter_context(metrics.MetricsServer(config.metrics))
        supervise(stop, [heartbeat], status=f"serving task {spec.task}")
    finally:
        owner.stop()
        running.close()
        log.info("owner: stopped")


def owner_status(config: OwnerConfig) -> dict[str, Any]:
    """The task as the owner's state folder and the chain see it (no broker needed)."""
    state = OwnerState(config.state)
    spec = state.spec()
    if spec is None or state.record() is None:
        raise ConfigError(f"{state.folder} holds no task yet: run `truscl owner init` first")
    dp = spec.dp
    status: dict[str, Any] = {
        "task": spec.task,
        "rounds": spec.rounds,
        "quorum": spec.quorum,
        "round_seconds": spec.round_seconds,
        "min_cohort": spec.min_cohort,
        "he_mode": spec.he_mode,
        "key_holders": [name for name, _ in spec.key_holders],
        "models_released": sorted(ModelStore(state.models).all(spec.n_params)),
        "epsilon_task": round(task_privacy(spec), 4),
        "epsilon_budget": dp.epsilon_budget,
        "delta": dp.delta,
        "rounds_budget_allows": rounds_within_budget(
            spec.sampling_rate, dp.noise_multiplier, dp.local_steps, dp.delta, dp.epsilon_budget
        ),
    }
    try:
        reader = ChainClient.at(connect(config.chain.rpc), config.chain.contract)
        record = reader.task(spec.task_id)
        status["rounds_anchored"] = record.rounds_anchored
        status["refused_rounds"] = [
            r for r in range(1, record.rounds_anchored + 1) if reader.round_refusal(spec.task_id, r)
        ]
    except ChainError as exc:
        status["chain_error"] = str(exc)
    return status
