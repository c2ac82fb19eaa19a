"""Role key files: raw bytes or pasted hex, only ever readable by their owner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from eth_account import Account

from truscl.errors import ConfigError
from truscl.keyfile import load_account, load_or_create_account

KEY = bytes(range(1, 33))
ADDRESS = Account.from_key(KEY).address


def secret(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    "data",
    [
        KEY,
        KEY.hex().encode(),
        KEY.hex().encode() + b"\n",
        b"0x" + KEY.hex().encode() + b"\n",
        b"0X" + KEY.hex().upper().encode(),
        KEY.hex().encode() + b"\r\n",
    ],
    ids=["raw", "hex", "hex-newline", "0x-newline", "upper", "crlf"],
)
def test_a_role_key_is_raw_bytes_or_hex_text(tmp_path: Path, data: bytes) -> None:
    path = secret(tmp_path / "admin.key", data)

    assert load_account(path).address == ADDRESS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        KEY[:31],
        KEY.hex().encode()[:-1] + b"\n",
        KEY.hex().encode() + b"\n\n",
        b" " + KEY.hex().encode(),
        KEY.hex().encode()[:-1] + b"g",
        b"0x" + KEY.hex().encode() + b"00",
    ],
)
def test_anything_else_is_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    path = secret(tmp_path / "admin.key", data)

    with pytest.raises(ConfigError, match="32 raw bytes or 64 hex digits") as caught:
        load_account(path)
    assert "\n" not in str(caught.value)
    assert KEY.hex() not in str(caught.value)  # never echo (part of) a secret


def test_a_zero_key_is_refused(tmp_path: Path) -> None:
    path = secret(tmp_path / "admin.key", b"0" * 64)

    with pytest.raises(ConfigError, match="no valid key"):
        load_account(path)


def test_a_pasted_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = secret(tmp_path / "admin.key", KEY.hex().encode() + b"\n", mode=0o644)

    with pytest.raises(ConfigError, match="mode 0644; it must be 0600"):
        load_account(path)


def test_a_symlink_to_a_key_is_refused(tmp_path: Path) -> None:
    target = secret(tmp_path / "admin.key", KEY)
    link = tmp_path / "link.key"
    link.symlink_to(target)

    with pytest.raises(ConfigError, match="symlink"):
        load_account(link)


def test_a_directory_or_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)

    with pytest.raises(ConfigError, match="not a regular file"):
        load_account(directory)
    with pytest.raises(ConfigError, match="does not exist"):
        load_account(tmp_path / "missing.key")


def test_a_role_key_is_never_made_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_account(tmp_path / "admin.key")
    assert not (tmp_path / "admin.key").exists()


def test_a_device_key_is_still_made_as_32_raw_bytes_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "device.key"

    account = load_or_create_account(path)

    assert len(path.read_bytes()) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_account(path).address == account.address == load_account(path).address
