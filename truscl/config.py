"""Strict TOML configuration files, shared by every role's service.

A typo or a wrong type stops a service with one clear line naming the file and the key, instead
of a service that runs with a default its operator did not mean. Relative paths in a file are
taken relative to the file's own folder, so a provisioned folder can be moved whole.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from truscl.errors import ConfigError
from truscl.mqtt import KEEPALIVE_S, BrokerSettings

T = TypeVar("T")
REQUIRED: Any = object()
ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
TASK = re.compile(r"0x[0-9a-fA-F]{64}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


class TomlReader:
    """Takes keys out of a parsed file so that whatever is left over is an unknown key."""

    def __init__(self, data: dict[str, Any], source: str, base: Path | None = None) -> None:
        self.data = data
        self.source = source
        self.base = base
        self.seen: set[str] = set()

    @classmethod
    def load(cls, path: Path) -> TomlReader:
        return cls(read_toml(path), str(path), Path(path).resolve().parent)

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def table(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(f"[{name}] must be a table")
        self.seen.add(name)
        return value

    def take(
        self,
        table: dict[str, Any],
        dotted: str,
        kind: type[T] | tuple[type, ...],
        default: Any = REQUIRED,
    ) -> Any:
        key = dotted.rsplit(".", 1)[-1]
        self.seen.add(dotted)
        if key not in table:
            if default is REQUIRED:
                raise self.fail(f"{dotted} is required")
            return default
        value = table[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise self.fail(f"{dotted} has the wrong type ({value!r})")
        return value

    def number(self, table: dict[str, Any], dotted: str, default: Any = REQUIRED) -> float:
        return float(self.take(table, dotted, (int, float), default))

    def path(self, table: dict[str, Any], dotted: str) -> Path:
        return self._resolve(self.take(table, dotted, str))

    def optional_path(self, table: dict[str, Any], dotted: str) -> Path | None:
        value: str | None = self.take(table, dotted, str, None)
        return None if value is None else self._resolve(value)

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.base is None else self.base / path

    def pattern(self, table: dict[str, Any], dotted: str, regex: re.Pattern[str], what: str) -> str:
        value: str = self.take(table, dotted, str)
        if not regex.fullmatch(value):
            raise self.fail(f"{dotted} must be {what}")
        return value

    def broker(self, name: str = "broker") -> BrokerSettings:
        """The ``[broker]`` table: host, port, and the TLS and login files of a deployment."""
        table = self.table(name)
        port = self.take(table, f"{name}.port", int, 1883)
        if not 0 < port < 65536:
            raise self.fail(f"{name}.port must be a TCP port")
        try:
            return BrokerSettings(
                host=self.take(table, f"{name}.host", str),
                port=port,
                ca=self.optional_path(table, f"{name}.ca"),
                cert=self.optional_path(table, f"{name}.cert"),
                key=self.optional_path(table, f"{name}.key"),
                username=self.take(table, f"{name}.username", str, None),
                password_file=self.optional_path(table, f"{name}.password_file"),
                keepalive=self.take(table, f"{name}.keepalive", int, KEEPALIVE_S),
            )
        except ConfigError as exc:
            raise self.fail(f"[{name}]: {exc}") from None

    def no_leftovers(self) -> None:
        for name, value in self.data.items():
            if isinstance(value, dict):
                unknown = [f"{name}.{k}" for k in value if f"{name}.{k}" not in self.seen]
            else:
                unknown = [] if name in self.seen else [name]
            if unknown:
                raise self.fail(f"unknown key {unknown[0]}")


def render_toml(top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> str:
    """A TOML file of plain keys then ``[tables]``, for the configurations truscl writes.

    Values are strings, numbers, booleans, paths or lists of those; ``None`` leaves a key out.
    """

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, Path | str):
            return json.dumps(str(item))  # a JSON string is a TOML basic string
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(v) for v in item) + "]"
        raise TypeError(f"cannot write {item!r} to TOML")

    def lines(table: dict[str, Any]) -> list[str]:
        return [f"{key} = {value(item)}" for key, item in table.items() if item is not None]

    parts = lines(top)
    for name, table in tables.items():
        parts += ["", f"[{name}]", *lines(table)]
    return "\n".join(parts).lstrip("\n") + "\n"


def broker_table(settings: BrokerSettings) -> dict[str, Any]:
    """The ``[broker]`` table that :meth:`TomlReader.broker` reads back as ``settings``."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ca": settings.ca,
        "cert": settings.cert,
        "key": settings.key,
        "username": settings.username,
        "password_file": settings.password_file,
        "keepalive": None if settings.keepalive == KEEPALIVE_S else settings.keepalive,
    }
