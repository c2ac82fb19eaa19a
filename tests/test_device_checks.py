"""What a device keeps and checks: its key (0600), its outbox, proofs of its own updates."""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from eth_account import Account
from eth_utils import keccak

from truscl.agent.config import AgentConfig
from truscl.agent.device import check_inclusion
from truscl.agent.health import HEALTH_FILE, Fault, HealthBook, Status
from truscl.agent.outbox import Outbox
from truscl.agent.rounds import Drop, Phase, RoundBook
from truscl.agent.status import agent_status, describe
from truscl.errors import ConfigError, ProtocolError
from truscl.keyfile import load_or_create_account, read_secret
from truscl.wire import UpdateRecord, merkle_proof, merkle_root


def test_a_device_key_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"

    first = load_or_create_account(path)
    again = load_or_create_account(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.address == again.address
    assert not list(path.parent.glob(".*tmp"))


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    load_or_create_account(path)
    os.chmod(path, 0o644)

    with pytest.raises(ConfigError, match="0600"):
        load_or_create_account(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_secret(tmp_path / "missing")


def test_a_damaged_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)

    with pytest.raises(ConfigError, match="32 raw bytes"):
        load_or_create_account(path)


def test_the_outbox_keeps_updates_across_a_restart_until_acknowledged(tmp_path: Path) -> None:
    # Prepare: two rounds built, each update entering the outbox with its round's state
    db = tmp_path / "outbox.sqlite"
    outbox = Outbox(db)
    book = RoundBook()
    for round_no, blob in ((1, b"update one"), (2, b"update two")):
        book.announced(round_no, b"\x00" * 32, deadline=100.0)
        book.charged(round_no, ledger_index=round_no - 1, readings=128)
        (built,) = book.built(round_no, keccak(blob), _record(round_no), 0.0).changed
        outbox.build(built, "t/updates/a", blob)
    outbox.build(built, "t/updates/a", b"update two")  # a retry stores nothing new
    outbox.close()
    # Execute: the agent restarts, then the receipt for round 1 arrives (twice: the second
    # finds nothing to drop)
    reopened = Outbox(db)
    before = reopened.pending()
    book = RoundBook(reopened.rounds(), [(p.blob_id, p.round) for p in before])
    receipt = book.receipt(keccak(b"update one"), True, "", 1)
    reopened.save(receipt.changed, [d.update_id for d in receipt.decisions if isinstance(d, Drop)])
    reopened.save([], [keccak(b"update one")])
    reopened.close()
    # Assert: what the receipt changed is written, in one transaction with the drop
    again = Outbox(db)
    assert [(p.round, p.blob) for p in before] == [(1, b"update one"), (2, b"update two")]
    assert [p.blob_id for p in again.pending()] == [keccak(b"update two")]
    assert [s.phase for s in again.rounds()] == [Phase.ACCEPTED, Phase.BUILT]
    assert len(again) == 1


def test_a_receipt_drops_its_update_only_with_the_state_it_changes(tmp_path: Path) -> None:
    # Prepare: a round built, its update in the outbox
    outbox = Outbox(tmp_path / "outbox.sqlite")
    book = RoundBook()
    book.announced(1, b"\x00" * 32, deadline=100.0)
    book.charged(1, ledger_index=0, readings=128)
    (built,) = book.built(1, keccak(b"update one"), _record(1), 0.0).changed
    outbox.build(built, "t/updates/a", b"update one")
    unwritable = replace(built, phase=Phase.ACCEPTED, model_hash=object())  # type: ignore[arg-type]

    # Execute: the receipt's state cannot be written
    with pytest.raises(sqlite3.Error):
        outbox.save([unwritable], [keccak(b"update one")])

    # Assert: nor is the update dropped: the next receipt will drop it
    assert [p.blob for p in outbox.pending()] == [b"update one"]
    assert [s.phase for s in outbox.rounds()] == [Phase.BUILT]


# -- inclusion proofs: a device checks that the proof is for its own update ----------------


def _record(i: int) -> UpdateRecord:
    return UpdateRecord(
        task=b"\x01" * 32,
        round=3,
        device=Account.create().address,
        ciphertext_hash=keccak(text=f"ct {i}"),
        context=b"\x02" * 32,
        samples=100,
        epsilon_micros=i,
        data_root=b"\x03" * 32,
    )


def _inclusion(leaf: bytes, leaves: list[bytes], proof_for: bytes | None = None) -> dict:
    return {
        "round": 3,
        "leaf": leaf,
        "proof": merkle_proof(leaves, proof_for or leaf),
        "root": merkle_root(leaves),
        "anchor_tx": "0x",
    }


def test_a_device_accepts_the_proof_of_its_own_update() -> None:
    records = [_record(i) for i in range(5)]
    leaves = [r.leaf() for r in records]

    check_inclusion(records[2], _inclusion(leaves[2], leaves))


def test_a_device_refuses_another_devices_proof() -> None:
    # Prepare: the aggregator dropped our update and sends someone else's valid proof
    ours = _record(99)
    records = [_record(i) for i in range(4)]
    leaves = [r.leaf() for r in records]

    with pytest.raises(ProtocolError, match="another update"):
        check_inclusion(ours, _inclusion(leaves[0], leaves))
    # our leaf with someone else's proof does not verify either
    with pytest.raises(ProtocolError, match="does not verify"):
        check_inclusion(ours, _inclusion(ours.leaf(), leaves, proof_for=leaves[0]))
    with pytest.raises(ProtocolError, match="sent nothing"):
        check_inclusion(None, _inclusion(leaves[0], leaves))


def test_status_shows_round_states_from_the_state_file_without_the_network(
    tmp_path: Path,
) -> None:
    # Prepare: a device's state folder after a few rounds; its chain node is unreachable
    load_or_create_account(tmp_path / "device.key")
    book = RoundBook()
    for round_no in (1, 2, 3, 4):
        book.announced(round_no, b"\x00" * 32, deadline=100.0)
        if round_no == 3:
            continue  # skipped when round 4 came
        book.charged(round_no, ledger_index=round_no - 1, readings=128)
        book.built(round_no, keccak(bytes([round_no])), _record(round_no), 0.0)
        book.sent(round_no)
    book.receipt(keccak(b"\x01"), accepted=True, reason="", counted_in=1)
    book.included(1, "0xanchor")
    book.receipt(keccak(b"\x02"), accepted=False, reason="wrong-round", counted_in=0)
    state = Outbox(tmp_path / "outbox.sqlite")
    state.save(book.states())
    sent = book.get(4)
    assert sent is not None
    state.build(sent, "t/updates/a", b"\x04")
    state.close()
    health = HealthBook(tmp_path / HEALTH_FILE)  # what the sampler writes beside the state
    health.record(1_704_672_000.0, [Fault("co2", Status.STUCK, "same raw value for 12 reads")])
    config = AgentConfig.from_dict(
        {
            "task": "0x" + "ab" * 32,
            "device": {"key": str(tmp_path / "device.key"), "state": str(tmp_path)},
            "broker": {"host": "127.0.0.1", "port": 1883},
            "chain": {"rpc": "http://127.0.0.1:9", "contract": "0x" + "12" * 20},
        }
    )
    # Execute
    status = agent_status(config)
    text = describe(status)
    # Assert
    assert status["registered"] is None and "chain_error" in status
    assert {phase: rounds for phase, rounds in status["rounds"].items() if rounds} == {
        "included": [1],
        "rejected": [2],
        "skipped": [3],
        "sent": [4],
    }
    assert "rounds    skipped 3, sent 4, rejected 2, included 1" in text
    assert "outbox    1 update(s) waiting for a receipt (rounds 4)" in text
    assert status["sensors"]["sensors"]["co2"]["status"] == "stuck"
    assert any(
        line.startswith("sensor") and "co2" in line and "STUCK" in line
        for line in text.splitlines()
    )
