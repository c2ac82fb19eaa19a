"""The archive's group commit on a real file system, flushed by one syncfs (where the platform
has it) or by an fsync per blob: nothing in place before ``commit``, every blob in place (and
readable by its id) after it, and nothing half-written left by a failure; and an update read
back only under its own id."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from eth_account import Account
from eth_utils import keccak

from truscl import files
from truscl.errors import ProtocolError
from truscl.server.archive import Archive
from truscl.wire import Domain, Update

FLUSHES = [
    pytest.param(
        True,
        id="syncfs",
        marks=pytest.mark.skipif(files.syncfs is None, reason="no syncfs here"),
    ),
    pytest.param(False, id="fsync-each"),
]


@pytest.mark.parametrize("sync_file_system", FLUSHES)
def test_blobs_written_later_are_in_place_only_after_commit(
    tmp_path: Path, sync_file_system: bool
) -> None:
    archive = Archive(tmp_path, sync_file_system)
    blobs = [os.urandom(10_000 + n) for n in range(10)]

    for blob in blobs:
        archive.put_later(blob, keccak(blob))
    archive.put_later(blobs[0], keccak(blobs[0]))  # the same blob twice is stored once
    assert not any(path.name[0] != "." for path in (tmp_path / "blobs").iterdir())
    archive.commit()

    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted(
        keccak(b).hex() for b in blobs
    )
    assert [archive.get(keccak(b).hex()) for b in blobs] == blobs
    archive.commit()  # nothing pending: nothing to do


@pytest.mark.parametrize("sync_file_system", FLUSHES)
def test_a_failed_write_fails_the_commit_and_leaves_no_temporary_file(
    tmp_path: Path, sync_file_system: bool
) -> None:
    archive = Archive(tmp_path, sync_file_system)
    good = os.urandom(1000)
    archive.put_later(good, keccak(good))
    bad = os.urandom(1000)
    # a directory where the blob's temporary file must go: its write fails (as root too)
    obstacle = tmp_path / "blobs" / f".{keccak(bad).hex()}.{os.getpid()}.tmp"
    obstacle.mkdir()
    archive.put_later(bad, keccak(bad))

    with pytest.raises(OSError):
        archive.commit()

    # Assert: neither is in place (the commit is all or nothing), the good one's temporary
    # file is gone, and the archive takes both once the obstacle is gone
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [obstacle.name]
    obstacle.rmdir()
    archive.put_later(good, keccak(good))
    archive.put_later(bad, keccak(bad))
    archive.commit()
    assert archive.get(keccak(bad).hex()) == bad and archive.get(keccak(good).hex()) == good


@pytest.mark.parametrize("sync_file_system", FLUSHES)
def test_a_blob_folder_gone_fails_the_commit_not_the_hand_over(
    tmp_path: Path, sync_file_system: bool
) -> None:
    # Prepare: the blob folder replaced by a file
    archive = Archive(tmp_path, sync_file_system)
    blobs = tmp_path / "blobs"
    blobs.rmdir()
    blobs.write_bytes(b"")
    blob = os.urandom(1000)

    # Execute: handing the blob over does not fail (the aggregator has added its update to the
    # sum already: only the commit decides), the commit does
    archive.put_later(blob, keccak(blob))
    with pytest.raises(OSError):
        archive.commit()

    # Assert: with the folder back, the same blob is stored
    blobs.unlink()
    blobs.mkdir()
    archive.put_later(blob, keccak(blob))
    archive.commit()
    assert archive.get(keccak(blob).hex()) == blob


def test_a_blob_handed_over_again_is_written_again(tmp_path: Path) -> None:
    # Prepare: a blob's file in place but not its bytes (a disk that lost them)
    archive = Archive(tmp_path)
    blob = os.urandom(1000)
    (tmp_path / "blobs" / keccak(blob).hex()).write_bytes(blob[:10])

    archive.put_later(blob, keccak(blob))
    archive.commit()

    assert archive.get(keccak(blob).hex()) == blob


@pytest.mark.skipif(files.syncfs is None, reason="no syncfs here")
def test_a_file_system_flush_raises_what_the_kernel_says(tmp_path: Path) -> None:
    assert files.syncfs is not None
    descriptor = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    files.syncfs(descriptor)  # a file system that takes its flush
    os.close(descriptor)

    with pytest.raises(OSError) as raised:
        files.syncfs(descriptor)  # closed: the C library's errno, as an OSError
    assert raised.value.errno == errno.EBADF


def test_an_update_is_read_back_only_under_its_own_id(tmp_path: Path) -> None:
    # Prepare: a signed update archived under its id, its bytes also under their keccak, and
    # a blob that is no update under a name of the right form
    account = Account.create()
    update = Update(
        task=b"\x01" * 32,
        round=1,
        device=bytes.fromhex(account.address[2:]),
        ciphertext=os.urandom(3000),
        context=b"\x02" * 32,
        samples=10,
        epsilon_micros=1,
        data_root=b"\x03" * 32,
    ).signed(account, Domain(chain_id=31337, contract="0x" + "ab" * 20))
    archive = Archive(tmp_path)
    blob, garbage = update.encode(), os.urandom(500)
    archive.put_later(blob, update.ident)
    archive.put_later(blob, keccak(blob))
    archive.put_later(garbage, keccak(b"a name"))
    archive.commit()

    # Execute and assert: its id reads it; the other two names are refused, each saying so
    assert archive.update(update.ident.hex()) == (blob, update)
    with pytest.raises(ProtocolError, match=r"does not match its name$"):
        archive.update(keccak(blob).hex())
    with pytest.raises(ProtocolError, match="does not match its name: "):
        archive.update(keccak(b"a name").hex())
