"""Secret files (device keys, the owner's CKKS secret context) with mode 0600.

A secret is written to a temporary file created with mode 0600 (never wider, even briefly, and
whatever the umask), synced, then hard-linked to its name: it appears whole or not at all, and
an existing secret is never overwritten (``FileExistsError``), since losing a key loses the
device's identity or every open task's aggregate. Reading refuses a symlink and a file that
group or others can access, as ssh does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from truscl.errors import ConfigError


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_secret(path: str | os.PathLike[str]) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"secret file {os.fspath(path)} does not exist") from None
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise ConfigError(f"secret file {os.fspath(path)} has mode {mode:04o}; it must be 0600")
        return handle.read()


def load_or_create_account(path: str | os.PathLike[str]) -> LocalAccount:
    """The device's (or a role's) Ethereum key, made on first start."""
    if not Path(path).exists():
        write_secret(path, Account.create().key)
    key = read_secret(path)
    if len(key) != 32:
        raise ConfigError(f"key file {os.fspath(path)} must hold 32 raw bytes, has {len(key)}")
    account: LocalAccount = Account.from_key(key)
    return account
