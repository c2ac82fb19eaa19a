"""``truscl guardian init`` and ``truscl guardian run``: a key guardian as a service.

``init`` joins the owner's key generation for the task named in ``guardian.toml`` (the owner
runs ``truscl owner init`` at the same time) and leaves the guardian's key share (0600) and the
signed transcript in its state folder. ``run`` serves the task, however often it is restarted:
it decrypts its part of each anchored aggregate once, and refuses everything else.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from truscl.chain import ChainClient
from truscl.chain.rpc import connect
from truscl.errors import ConfigError
from truscl.keyfile import load_account
from truscl.privacy.ckks import context_hash
from truscl.server.config import OWNER_HOLDER, GuardianConfig
from truscl.server.guardian import Guardian, GuardianRecords
from truscl.server.keygen import (
    HolderState,
    KeygenBoard,
    KeygenRecord,
    await_session,
    run_keygen_holder,
)
from truscl.systemd import Heartbeat, supervise
from truscl.wire.signing import Domain

log = logging.getLogger(__name__)


def guardian_client(config: GuardianConfig) -> ChainClient:
    """Reads the chain and signs with the guardian's key (it sends no transaction)."""
    return ChainClient.at(
        connect(config.chain.rpc), config.chain.contract, load_account(config.key)
    )


def init_guardian(config: GuardianConfig) -> KeygenRecord:
    """Take part in the task's key generation; a run cut short is finished by running it
    again (the share, seed share and contribution on disk are reused)."""
    state = HolderState(config.state)
    if state.record() is not None:
        raise ConfigError(
            f"{state.folder} already holds a key share of task {config.task}; "
            "`truscl guardian run` serves it"
        )
    chain = guardian_client(config)
    account = load_account(config.key)
    with KeygenBoard(
        task=config.task,
        name=config.name,
        account=account,
        domain=Domain(chain.chain_id, chain.address),
        broker=config.broker,
    ) as board:
        log.info(
            "guardian %s: waiting for the owner's key generation of %s", config.name, config.task
        )
        terms = await_session(board, OWNER_HOLDER, config.owner)
        _, record = run_keygen_holder(board, terms, state)
    return record


def _load(config: GuardianConfig) -> tuple[HolderState, KeygenRecord]:
    state = HolderState(config.state)
    record = state.record()
    if record is None:
        raise ConfigError(f"{state.folder} holds no key share yet: run `truscl guardian init`")
    return state, record


def run_guardian(config: GuardianConfig, stop: threading.Event) -> None:
    state, record = _load(config)
    chain = guardian_client(config)
    public = state.public_context()
    if context_hash(public) != record.transcript.context_hash:
        raise ConfigError(f"{state.context_file} is not the context of {state.record_file}")
    heartbeat = Heartbeat("guardian")
    guardian = Guardian(
        task=config.task,
        owner=config.owner,
        name=config.name,
        share=state.share(config.name, record.terms.profile),
        public_context=public,
        keygen_digest=record.transcript.digest(),
        chain=chain,
        account=load_account(config.key),
        broker=config.broker,
        records=GuardianRecords(state.folder),
        heartbeat=heartbeat,
    ).start()
    log.info("guardian %s: serving task %s", config.name, config.task)
    try:
        supervise(stop, [heartbeat], status=f"guardian {config.name} of task {config.task}")
    finally:
        guardian.stop()
        log.info("guardian %s: stopped", config.name)


def guardian_status(config: GuardianConfig) -> dict[str, Any]:
    """What the guardian's state folder holds: its key generation, the rounds it decrypted,
    and the requests it refused, by reason."""
    state, record = _load(config)
    records = GuardianRecords(state.folder)
    return {
        "task": config.task,
        "name": config.name,
        "key_holders": [name for name, _ in record.terms.holders],
        "context_hash": "0x" + record.transcript.context_hash.hex(),
        "keygen_digest": "0x" + record.transcript.digest().hex(),
        "rounds_decrypted": sorted(int(p.stem) for p in records.folder.glob("*.cbor")),
        "refusals": dict(records.refusals()),
    }
