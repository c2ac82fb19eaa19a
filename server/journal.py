"""The aggregator's journal: what it has promised, on disk before the promise leaves.

A receipt tells a device it may forget its update, so the aggregator must not forget it either:
each accepted update is archived (the archive fsyncs the blob) and journaled here before its
receipt is sent. The journal holds, per round, its model hash, its deadline and its state, and
the ids of the updates it counted in the order they were accepted. A restarted aggregator
rebuilds the open round from it and from the archive (re-adding the archived ciphertexts gives
the same sum: CKKS addition is exact), keeps the deadline, and takes up the rounds that closed
but were not yet anchored or delivered.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives a power cut, and
each state change is one transaction, so a crash leaves the state before it or after it.

Refusals are counted by round and reason (the report and the status page show them) through a
second connection without an fsync per commit: a flood of forged updates must not cost a disk
flush each, and a count lost to a power cut promises nothing to anyone.

Round states, in order: ``open`` (taking updates), ``closed`` (its updates are final; queued to
be anchored), ``anchored`` (on chain; the manifest, the aggregate and the inclusion proofs are
still to be published), ``delivered``.

A task's aggregator may run as several shards, one process each, that share this file (see
:mod:`server.aggregator`). It is their one decision point: each accepted update is journaled
with the shard that counted it, and the ``UNIQUE`` constraints refuse the commit of a shard that
counted an update (or a device's update for a round) that another shard committed first. To
close an open round, shard 0 marks it ``closing``; every other shard then stops counting in it
and hands in its partial sum here (``partials``), which shard 0 merges.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from truscl.errors import ProtocolError

SCHEMA = """
CREATE TABLE IF NOT EXISTS task (
    id      TEXT PRIMARY KEY                  -- the one task this journal belongs to
);
CREATE TABLE IF NOT EXISTS rounds (
    round      INTEGER PRIMARY KEY,
    model_hash BLOB NOT NULL,                 -- the model the round trains on
    deadline   REAL NOT NULL,                 -- on the aggregator's clock
    state      TEXT NOT NULL CHECK (state IN ('open', 'closed', 'anchored', 'delivered')),
    anchor_tx  TEXT                           -- set from 'anchored' on
);
CREATE TABLE IF NOT EXISTS accepted (
    round    INTEGER NOT NULL REFERENCES rounds(round),  -- the round that counts it
    seq      INTEGER NOT NULL,                -- order of acceptance within the round
    blob     TEXT NOT NULL,                   -- archive id (keccak hex) of the signed update
    device   TEXT NOT NULL,                   -- checksum address of its signer
    made_for INTEGER NOT NULL,                -- the round it was made for (round - 1 if late)
    shard    INTEGER NOT NULL DEFAULT 0,      -- the aggregator shard that counted it
    PRIMARY KEY (round, seq),
    UNIQUE (round, blob),
    UNIQUE (round, device, made_for)
);
CREATE TABLE IF NOT EXISTS closing (
    round    INTEGER PRIMARY KEY REFERENCES rounds(round)  -- shard 0 is closing it
);
CREATE TABLE IF NOT EXISTS partials (
    round    INTEGER NOT NULL REFERENCES rounds(round),
    shard    INTEGER NOT NULL,
    partial  BLOB NOT NULL,                   -- rounds.PartialRound.encode(): no more counted
    PRIMARY KEY (round, shard)
);
CREATE TABLE IF NOT EXISTS rejected (
    round   INTEGER NOT NULL,                 -- the open round, else the last one closed (or 0)
    reason  TEXT NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (round, reason)
);
"""

STATES = ("open", "closed", "anchored", "delivered")
# How long a write waits for another shard's transaction before it fails (sqlite3.Error: the
# updates of that commit get no receipt and are sent again).
BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class JournaledRound:
    round: int
    model_hash: bytes
    deadline: float
    state: str
    anchor_tx: str | None


@dataclass(frozen=True)
class JournaledAcceptance:
    round: int  # the round that counts it
    blob: str
    device: str
    made_for: int
    shard: int = 0


@dataclass(frozen=True)
class JournaledUpdate:
    blob: str
    device: str
    made_for: int
    shard: int = 0


class Journal:
    """The journal of one task's rounds (one file; one writer per aggregator shard)."""

    def __init__(self, path: Path, task: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # shards take turns
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(accepted)")}
        if "shard" not in columns:  # a journal of a release before shards: all shard 0's
            self._db.execute("ALTER TABLE accepted ADD COLUMN shard INTEGER NOT NULL DEFAULT 0")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT id FROM task").fetchone()
            if row is None:
                self._db.execute("INSERT INTO task (id) VALUES (?)", (task.lower(),))
            elif row[0] != task.lower():
                raise ProtocolError(f"journal {path} belongs to task {row[0]}, not {task}")
        self._tally = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._tally.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._tally.execute("PRAGMA synchronous=NORMAL")

    @classmethod
    def read_only(cls, path: Path) -> Journal:
        """The journal as a reader (the report, the status page) sees it: it never writes,
        and reads while the aggregator writes (WAL)."""
        if not path.is_file():
            raise ProtocolError(f"{path} is not a journal")
        journal = cls.__new__(cls)
        uri = f"{path.resolve().as_uri()}?mode=ro"
        journal._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        journal._tally = journal._db
        return journal

    def open_round(self, round_no: int, model_hash: bytes, deadline: float) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO rounds (round, model_hash, deadline, state) VALUES (?, ?, ?, 'open')",
                (round_no, model_hash, deadline),
            )

    def accept(self, round_no: int, blob: str, device: str, made_for: int) -> None:
        self.accept_many([JournaledAcceptance(round_no, blob, device, made_for)])

    def accept_many(self, accepted: Sequence[JournaledAcceptance]) -> None:
        """Several accepted updates in one transaction (one fsync: the group commit), in order;
        all of them or, on an error, none."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO accepted (round, seq, blob, device, made_for, shard) VALUES "
                "(?, (SELECT COUNT(*) FROM accepted WHERE round = ?), ?, ?, ?, ?)",
                [(a.round, a.round, a.blob, a.device, a.made_for, a.shard) for a in accepted],
            )

    def counted(self, round_no: int, device: str, made_for: int) -> str | None:
        """The blob id of the update of ``device`` made for ``made_for`` that ``round_no``
        counted, if any (whichever shard counted it)."""
        row = self._db.execute(
            "SELECT blob FROM accepted WHERE round = ? AND device = ? AND made_for = ?",
            (round_no, device, made_for),
        ).fetchone()
        return None if row is None else str(row[0])

    def tally(self, round_no: int) -> tuple[int, frozenset[str]]:
        """How many updates ``round_no`` counted, and the devices whose update made for it is
        among them, over every shard."""
        rows = self._db.execute(
            "SELECT device, made_for FROM accepted WHERE round = ?", (round_no,)
        ).fetchall()
        return len(rows), frozenset(device for device, made_for in rows if made_for == round_no)

    def mark_closing(self, round_no: int) -> None:
        """Shard 0 closes ``round_no``: the other shards count no more in it."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR IGNORE INTO closing (round) VALUES (?)", (round_no,))

    def is_closing(self, round_no: int) -> bool:
        row = self._db.execute("SELECT 1 FROM closing WHERE round = ?", (round_no,)).fetchone()
        return row is not None

    def put_partial(self, round_no: int, shard: int, partial: bytes) -> None:
        """A shard's partial sum of a closing round, in place of one it handed in before (shard
        0, restarted with fewer shards, now counts those no longer run too)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO partials (round, shard, partial) VALUES (?, ?, ?)",
                (round_no, shard, partial),
            )

    def handed_in(self, round_no: int) -> set[int]:
        """The shards that handed in their partial sum of ``round_no``."""
        rows = self._db.execute("SELECT shard FROM partials WHERE round = ?", (round_no,))
        return {int(shard) for (shard,) in rows}

    def partials(self, round_no: int) -> dict[int, bytes]:
        """The partial sums handed in for ``round_no``, by shard."""
        rows = self._db.execute(
            "SELECT shard, partial FROM partials WHERE round = ?", (round_no,)
        ).fetchall()
        return {int(shard): bytes(partial) for shard, partial in rows}

    def count_rejection(self, round_no: int, reason: str) -> None:
        self._tally.execute(
            "INSERT INTO rejected (round, reason, count) VALUES (?, ?, 1) "
            "ON CONFLICT (round, reason) DO UPDATE SET count = count + 1",
            (round_no, reason),
        )

    def rejections(self) -> dict[int, dict[str, int]]:
        """Refusals counted, by round and reason."""
        counts: dict[int, dict[str, int]] = {}
        for round_no, reason, count in self._db.execute(
            "SELECT round, reason, count FROM rejected ORDER BY round, reason"
        ):
            counts.setdefault(round_no, {})[reason] = count
        return counts

    def set_state(self, round_no: int, state: str, anchor_tx: str | None = None) -> None:
        """Move a round forward (never back: a restart must not undo a step)."""
        current = self.round(round_no)
        if current is None or STATES.index(state) < STATES.index(current.state):
            raise ProtocolError(f"round {round_no} cannot go to {state!r}")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE rounds SET state = ?, anchor_tx = COALESCE(?, anchor_tx) WHERE round = ?",
                (state, anchor_tx, round_no),
            )

    def round(self, round_no: int) -> JournaledRound | None:
        row = self._db.execute(
            "SELECT round, model_hash, deadline, state, anchor_tx FROM rounds WHERE round = ?",
            (round_no,),
        ).fetchone()
        return None if row is None else JournaledRound(*row)

    def rounds(self, *states: str) -> list[JournaledRound]:
        """Rounds in these states (all if none is named), oldest first."""
        rows = self._db.execute(
            "SELECT round, model_hash, deadline, state, anchor_tx FROM rounds ORDER BY round"
        ).fetchall()
        return [JournaledRound(*row) for row in rows if not states or row[3] in states]

    def last_round(self) -> int:
        row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return int(row[0] or 0)

    def updates(self, round_no: int) -> list[JournaledUpdate]:
        """The updates ``round_no`` counted, by every shard, in the order they were accepted."""
        rows = self._db.execute(
            "SELECT blob, device, made_for, shard FROM accepted WHERE round = ? ORDER BY seq",
            (round_no,),
        ).fetchall()
        return [JournaledUpdate(*row) for row in rows]

    def close(self) -> None:
        self._tally.close()
        self._db.close()
