"""Updates waiting for the aggregator's receipt, kept in SQLite.

An update enters the outbox before its first byte is published and leaves it only when the
aggregator has decided on it (accepted or rejected for good), so a broker outage or a restart
of the agent loses nothing: on every (re)connection the agent publishes what is still here.
SQLite in WAL mode with ``synchronous=FULL`` makes each put durable when it returns.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from eth_utils import keccak


@dataclass(frozen=True)
class Pending:
    blob_id: bytes
    round: int
    topic: str
    blob: bytes


class Outbox:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " blob_id BLOB PRIMARY KEY, round INTEGER NOT NULL,"
            " topic TEXT NOT NULL, blob BLOB NOT NULL)"
        )

    def put(self, round_no: int, topic: str, blob: bytes) -> bytes:
        ident = keccak(blob)
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?)", (ident, round_no, topic, blob)
            )
        return ident

    def remove(self, blob_id: bytes) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM outbox WHERE blob_id = ?", (blob_id,))
        return cursor.rowcount > 0

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

    def close(self) -> None:
        with self._lock:
            self._db.close()
