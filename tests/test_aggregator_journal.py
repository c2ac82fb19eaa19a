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
