"""The device's state file: updates waiting for a receipt, and where each round stands.

An update enters the outbox before its first byte is published and leaves it only when the
aggregator has decided on it (a receipt it signed), so a broker outage or a restart of the agent
loses nothing: the agent publishes what is still here on every (re)connection and, with a
bounded backoff, while a receipt is missing. Beside it, in the same file, each round's state
(:class:`truscl.agent.rounds.RoundState`) is kept, so a restart resumes every round where it
was: which rounds were charged, each update's id and the record its inclusion proof must prove.
A round becomes ``built`` and its update enters the outbox in one transaction, so a restart
never finds one without the other; likewise a receipt's round state and its update leaving.
SQLite in WAL mode with ``synchronous=FULL`` makes each write durable when it returns, and lets
``truscl agent status`` read while the agent writes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from truscl.agent.rounds import Phase, RoundState
from truscl.wire import UpdateRecord

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox ("
    " blob_id BLOB PRIMARY KEY, round INTEGER NOT NULL,"
    " topic TEXT NOT NULL, blob BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rounds ("
    " round INTEGER PRIMARY KEY, phase TEXT NOT NULL, deadline REAL NOT NULL,"
    " model_hash BLOB NOT NULL, ledger_index INTEGER, update_id BLOB, record BLOB,"
    " reason TEXT NOT NULL, counted_in INTEGER NOT NULL, anchor_tx TEXT NOT NULL,"
    " readings INTEGER)",
)
_ROUND_COLUMNS = (
    "round, phase, deadline, model_hash, ledger_index, update_id, record, reason, counted_in,"
    " anchor_tx, readings"
)


@dataclass(frozen=True)
class Pending:
    blob_id: bytes
    round: int
    topic: str
    blob: bytes


def _row(state: RoundState) -> tuple[object, ...]:
    record = None if state.record is None else cbor2.dumps(list(state.record))
    return (
        state.round,
        str(state.phase),
        state.deadline,
        state.model_hash,
        state.ledger_index,
        state.update_id,
        record,
        state.reason,
        state.counted_in,
        state.anchor_tx,
        state.readings,
    )


def _state(row: tuple[Any, ...]) -> RoundState:
    round_no, phase, deadline, model_hash, ledger_index, update_id, record, *rest = row
    reason, counted_in, anchor_tx, readings = rest
    return RoundState(
        round=round_no,
        phase=Phase(phase),
        deadline=float(deadline),
        model_hash=bytes(model_hash),
        ledger_index=ledger_index,
        update_id=None if update_id is None else bytes(update_id),
        record=None if record is None else UpdateRecord(*cbor2.loads(record)),
        reason=reason,
        counted_in=counted_in,
        anchor_tx=anchor_tx,
        readings=readings,
    )


class Outbox:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in SCHEMA:
            self._db.execute(statement)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}
        if "readings" not in columns:  # a state file from before windows could be partial
            self._db.execute("ALTER TABLE rounds ADD COLUMN readings INTEGER")

    def get(self, blob_id: bytes) -> Pending | None:
        with self._lock:
            row = self._db.execute(
                "SELECT blob_id, round, topic, blob FROM outbox WHERE blob_id = ?", (blob_id,)
            ).fetchone()
        return None if row is None else Pending(bytes(row[0]), row[1], row[2], bytes(row[3]))

    def pending(self) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT blob_id, round, topic, blob FROM outbox ORDER BY round"
            ).fetchall()
        return [Pending(bytes(r[0]), r[1], r[2], bytes(r[3])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    # -- round states ------------------------------------------------------------------------

    def save(self, states: list[RoundState], drop: Sequence[bytes] = ()) -> None:
        """Write round states and remove the updates ``drop`` names (their receipts came) from
        the outbox, all or none: one commit, so a round's receipt costs one flush to disk."""
        if not states and not drop:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._save(states)
                self._db.executemany(
                    "DELETE FROM outbox WHERE blob_id = ?", [(blob_id,) for blob_id in drop]
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def build(self, state: RoundState, topic: str, blob: bytes) -> None:
        """The round's update enters the outbox and the round becomes ``built``, in one
        transaction: after a crash, either both happened or neither. The update is stored
        under the state's ``update_id``, its id (:attr:`truscl.wire.update.Update.ident`)."""
        if state.update_id is None:
            raise ValueError(f"round {state.round} has no update id")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?)",
                    (state.update_id, state.round, topic, blob),
                )
                self._save([state])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def rounds(self) -> list[RoundState]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round"
            ).fetchall()
        return [_state(row) for row in rows]

    def _save(self, states: list[RoundState]) -> None:
        self._db.executemany(
            f"INSERT OR REPLACE INTO rounds ({_ROUND_COLUMNS}) VALUES ({', '.join('?' * 11)})",
            [_row(s) for s in states],
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
