"""What a device keeps on disk: its key (0600) and the outbox of unacknowledged updates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.outbox import Outbox
from truscl.errors import ConfigError
from truscl.keyfile import load_or_create_account, read_secret


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
    # Prepare
    db = tmp_path / "outbox.sqlite"
    outbox = Outbox(db)
    first = outbox.put(1, "t/updates/a", b"update one")
    second = outbox.put(2, "t/updates/a", b"update two")
    outbox.put(1, "t/updates/a", b"update one")  # a retry stores nothing new
    outbox.close()
    # Execute: the agent restarts, then the receipt for round 1 arrives
    reopened = Outbox(db)
    before = reopened.pending()
    removed = reopened.remove(first)
    removed_again = reopened.remove(first)
    # Assert
    assert [(p.round, p.blob) for p in before] == [(1, b"update one"), (2, b"update two")]
    assert removed and not removed_again
    assert [p.blob_id for p in reopened.pending()] == [second]
    assert len(reopened) == 1
