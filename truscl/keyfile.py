"""Secret files (device keys, the owner's CKKS secret context) with mode 0600.

A secret is written to a temporary file created with mode 0600 (never wider, even briefly, and
whatever the umask), synced, then hard-linked to its name: it appears whole or not at all, and
an existing secret is never overwritten (``FileExistsError``), since losing a key loses the
device's identity or every open task's aggregate. Reading refuses a symlink and a file that
group or others can access, as ssh does.

An Ethereum key file holds either the 32 raw bytes truscl writes for a device, or the key as
text (64 hex digits, with or without ``0x``, a trailing newline allowed), which is what an
operator pastes from a wallet or a testnet faucet's key generator. The two cannot be confused:
text is at least 64 bytes long.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from truscl.errors import ConfigError
from truscl.wire.signing import SigningKey

if TYPE_CHECKING:  # eth-account is loaded by the roles that send transactions, not by a device
    from eth_account.signers.local import LocalAccount


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
    """The bytes of a secret file that only its owner can read; ``ConfigError`` otherwise."""
    name = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"secret file {name} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise ConfigError(f"secret file {name} is a symlink; name the file itself") from None
        raise ConfigError(f"cannot open secret file {name}: {exc.strerror}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"secret file {name} is not a regular file")
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077:
            raise ConfigError(f"secret file {name} has mode {mode:04o}; it must be 0600")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


_HEX_KEY = re.compile(rb"(?:0[xX])?([0-9a-fA-F]{64})(?:\r?\n)?")


def parse_key(data: bytes, name: str) -> bytes:
    """The 32-byte key in a key file's contents: raw bytes, or 64 hex digits as text."""
    if len(data) == 32:
        return data
    match = _HEX_KEY.fullmatch(data)
    if match is None:
        raise ConfigError(
            f"key file {name} must hold 32 raw bytes or 64 hex digits "
            f"(optional 0x, optional trailing newline); it has {len(data)} bytes that are neither"
        )
    return bytes.fromhex(match.group(1).decode("ascii"))


def load_account(path: str | os.PathLike[str]) -> LocalAccount:
    """A role's existing Ethereum key (admin, registrar, owner): never made here.

    An operator's key pays gas and holds roles on a shared chain, so a missing file is an
    error rather than a fresh, unfunded, unregistered key.
    """
    from eth_account import Account

    account: LocalAccount = Account.from_key(load_signing_key(path).key)
    return account


def load_or_create_account(path: str | os.PathLike[str]) -> LocalAccount:
    """A role's Ethereum key, made on first start (32 raw bytes)."""
    load_or_create_signing_key(path)
    return load_account(path)


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """An existing key that signs messages only (a device's): no transactions, no eth-account."""
    key = parse_key(read_secret(path), os.fspath(path))
    try:
        return SigningKey.from_key(key)
    except ValueError as exc:  # zero, or not below the curve order
        raise ConfigError(f"key file {os.fspath(path)} holds no valid key: {exc}") from None


def load_or_create_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The device's key, made on first start (32 raw bytes)."""
    if not Path(path).exists():
        write_secret(path, SigningKey.create().key)
    return load_signing_key(path)
