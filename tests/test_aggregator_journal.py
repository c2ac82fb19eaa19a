"""The aggregator's journal on a real SQLite file: what a restart reads back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from truscl.errors import ProtocolError
from truscl.server.journal import Journal, JournaledAcceptance

TASK = "0x" + "ab" * 32


def test_a_reopened_journal_holds_rounds_and_updates_in_order(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path, TASK)
    journal.open_round(1, b"\x01" * 32, 1_030.0)
    for n, device in enumerate(("0xA", "0xB", "0xC")):
        journal.accept(1, f"{n:064x}", device, 1)
    journal.set_state(1, "closed")
    journal.open_round(2, b"\x02" * 32, 2_000.0)
    journal.accept(2, "ff" * 32, "0xC", 1)  # late: made for round 1
    journal.close()

    again = Journal(path, TASK)

    assert [(r.round, r.state) for r in again.rounds()] == [(1, "closed"), (2, "open")]
    assert again.round(2).deadline == 2_000.0  # type: ignore[union-attr]
    assert [u.device for u in again.updates(1)] == ["0xA", "0xB", "0xC"]
    assert [(u.device, u.made_for) for u in again.updates(2)] == [("0xC", 1)]
    assert again.last_round() == 2
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_the_journal_refuses_what_would_count_twice_or_go_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite", TASK)
    journal.open_round(1, b"\x01" * 32, 10.0)
    journal.accept(1, "aa" * 32, "0xA", 1)
    with pytest.raises(sqlite3.IntegrityError):
        journal.accept(1, "bb" * 32, "0xA", 1)  # a second update of one device for one round
    with pytest.raises(sqlite3.IntegrityError):
        journal.accept(1, "aa" * 32, "0xB", 1)  # the same blob twice
    journal.set_state(1, "anchored", "0x" + "cd" * 32)
    with pytest.raises(ProtocolError):
        journal.set_state(1, "closed")
    assert journal.round(1).anchor_tx == "0x" + "cd" * 32  # type: ignore[union-attr]
    assert [u.blob for u in journal.updates(1)] == ["aa" * 32]


def test_a_journal_serves_one_task(tmp_path: Path) -> None:
    Journal(tmp_path / "journal.sqlite", TASK).close()
    with pytest.raises(ProtocolError, match="belongs to task"):
        Journal(tmp_path / "journal.sqlite", "0x" + "cd" * 32)


def test_a_group_of_acceptances_is_journaled_in_order_or_not_at_all(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite", TASK)
    journal.open_round(1, b"\x01" * 32, 10.0)
    journal.accept(1, "aa" * 32, "0xA", 1)
    group = [JournaledAcceptance(1, f"{n:064x}", f"0x{n}", 1) for n in range(1, 6)]

    journal.accept_many(group)
    with pytest.raises(sqlite3.IntegrityError):  # the second is journaled already: neither is kept
        journal.accept_many([JournaledAcceptance(1, "bb" * 32, "0xB", 1), group[0]])

    assert [u.blob for u in journal.updates(1)] == ["aa" * 32] + [a.blob for a in group]


def test_shards_share_one_journal_two_connections_one_file(tmp_path: Path) -> None:
    # Prepare: shard 0 and shard 1 of one task, each with its own connection to the file
    path = tmp_path / "journal.sqlite"
    leader, other = Journal(path, TASK), Journal(path, TASK)
    leader.open_round(1, b"\x01" * 32, 10.0)
    leader.accept_many([JournaledAcceptance(1, "aa" * 32, "0xA", 1, shard=0)])
    other.accept_many([JournaledAcceptance(1, "bb" * 32, "0xB", 1, shard=1)])
    other.accept_many([JournaledAcceptance(1, "cc" * 32, "0xC", 0, shard=1)])  # late

    # Execute: a race lost (the device counted by the other shard), then the close
    with pytest.raises(sqlite3.IntegrityError):
        leader.accept_many([JournaledAcceptance(1, "dd" * 32, "0xB", 1, shard=0)])
    leader.mark_closing(1)
    other.put_partial(1, 1, b"first")
    other.put_partial(1, 1, b"again")

    # Assert: each shard's rows, every shard's tally, who counted what, the latest partial
    assert [(u.blob[:2], u.shard) for u in leader.updates(1)] == [("aa", 0), ("bb", 1), ("cc", 1)]
    assert leader.tally(1) == (3, frozenset({"0xA", "0xB"}))
    assert leader.counted(1, "0xB", 1) == "bb" * 32 and leader.counted(1, "0xB", 0) is None
    assert other.is_closing(1) and not other.is_closing(2)
    assert leader.handed_in(1) == {1} and leader.partials(1) == {1: b"again"}


def test_a_journal_of_a_release_before_shards_is_all_shard_0s(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE task (id TEXT PRIMARY KEY);"
        "CREATE TABLE rounds (round INTEGER PRIMARY KEY, model_hash BLOB NOT NULL, deadline REAL"
        " NOT NULL, state TEXT NOT NULL, anchor_tx TEXT);"
        "CREATE TABLE accepted (round INTEGER NOT NULL, seq INTEGER NOT NULL, blob TEXT NOT NULL,"
        " device TEXT NOT NULL, made_for INTEGER NOT NULL, PRIMARY KEY (round, seq));"
        f"INSERT INTO task VALUES ('{TASK}');"
        "INSERT INTO rounds VALUES (1, x'01', 10.0, 'open', NULL);"
        "INSERT INTO accepted VALUES (1, 0, 'aa', '0xA', 1);"
    )
    old.close()

    journal = Journal(path, TASK)

    assert [(u.blob, u.shard) for u in journal.updates(1)] == [("aa", 0)]
