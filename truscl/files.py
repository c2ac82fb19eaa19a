"""Files that must never be seen half-written: write to a temporary name, fsync, rename."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """After a crash ``path`` holds the old bytes or the new ones, never a mix.

    The file has ``mode`` from its first byte (whatever the umask): a secret written with
    0o600 is never readable by others, even for a moment.
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        write_file(temporary, data, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    sync_directory(path.parent)  # the rename itself survives a power cut


def temporary_name(path: Path) -> Path:
    """Where ``path``'s next content is written before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_file(path: Path | str, data: bytes, mode: int = 0o644, *, fsync: bool = True) -> None:
    """Write ``data`` to a new file and fsync it, unless ``fsync`` is false: then the caller
    flushes it (:data:`syncfs`). Its name is not synced: see :func:`sync_directory`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


def sync_directory(path: Path) -> None:
    """fsync a directory: the names created or renamed in it survive a power cut."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _c_syncfs() -> Callable[[int], None] | None:
    """syncfs(2) from the C library, where it has it (Linux): ``None`` elsewhere."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes, syncfs.restype = [ctypes.c_int], ctypes.c_int

    def sync(fd: int) -> None:
        if syncfs(fd) != 0:  # ctypes releases the GIL for the call
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}")

    return sync


# Flush every file of the file system that holds the open file ``fd`` (data and metadata) in
# one go, and raise the writeback errors the file system has had since ``fd`` was opened (Linux
# 5.8 and later); ``None`` where the platform has no syncfs.
syncfs: Callable[[int], None] | None = _c_syncfs()
