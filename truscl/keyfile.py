"""Secret files (device keys, the owner's CKKS secret context) with mode 0600.

The file is created with 0600 from the first byte (``os.open`` with a mode, not ``chmod``
afterwards), written to a temporary name and renamed, so it is never readable by others and
never half-written. Reading refuses a file that group or others can access, as ssh does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from truscl.errors import ConfigError


def write_secret(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask; a stale tmp keeps its own
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret(path: Path) -> bytes:
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise ConfigError(f"secret file {path} does not exist") from None
    if mode & 0o077:
        raise ConfigError(f"secret file {path} has mode {mode:04o}; it must be 0600")
    return path.read_bytes()


def load_or_create_account(path: Path) -> LocalAccount:
    """The device's (or a role's) Ethereum key, made on first start."""
    path = Path(path)
    if not path.exists():
        write_secret(path, Account.create().key)
    key = read_secret(path)
    if len(key) != 32:
        raise ConfigError(f"key file {path} must hold 32 raw bytes, has {len(key)}")
    account: LocalAccount = Account.from_key(key)
    return account
