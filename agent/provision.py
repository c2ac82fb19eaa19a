"""``truscl agent provision``: a device's key and configuration, made before it is deployed.

The key is made once (mode 0600) and never overwritten, so provisioning again (say, once the
task and the broker identity are known) keeps the device's identity and only rewrites its
configuration. The address it prints is what the registrar puts on chain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from truscl.config import TomlReader, broker_table, render_toml
from truscl.errors import ConfigError
from truscl.files import write_atomically
from truscl.keyfile import load_or_create_signing_key, write_secret
from truscl.mqtt import BrokerSettings

NO_TASK = "0x" + "00" * 32  # a placeholder until the owner has created the task
NO_CONTRACT = "0x" + "00" * 20


@dataclass(frozen=True)
class ProvisionedDevice:
    address: str
    key: Path
    config: Path


def provision_agent(
    out: Path,
    *,
    broker: BrokerSettings,
    rpc: str,
    contract: str = NO_CONTRACT,
    task: str = NO_TASK,
    name: str | None = None,
    sensors: dict[str, Any] | None = None,
) -> ProvisionedDevice:
    """Make (or keep) ``out/device.key`` and write ``out/agent.toml``; paths in the file are
    relative to ``out``, so the folder can be copied whole to the device."""
    out.mkdir(parents=True, exist_ok=True)
    key = out / "device.key"
    account = load_or_create_signing_key(key)
    broker = _localise(broker, out / "broker")
    config = out / "agent.toml"
    config.write_text(
        "# The device agent's configuration (truscl agent run --config FILE), written by\n"
        "# `truscl agent provision`; see deploy/agent.toml for every key.\n"
        + render_toml(
            {"task": task},
            {
                "device": {"key": "device.key", "state": "state", "name": name},
                "broker": _relative(broker_table(broker), out),
                "chain": {"rpc": rpc, "contract": contract},
                "sensors": sensors or {"hardware": "pi"},
            },
        )
    )
    return ProvisionedDevice(account.address, key, config)


def device_broker(
    out: Path, identity: Path | None, host: str | None, port: int | None
) -> BrokerSettings:
    """The device's broker settings: its identity from ``truscl broker provision`` (with the
    host or port overridden if given), or a plain broker while it has none."""
    if identity is None:
        return BrokerSettings(host or "localhost", port or 1883)
    settings = TomlReader.load(identity / "broker.toml").broker()
    address = load_or_create_signing_key(out / "device.key").address.lower()
    if settings.username != address:
        raise ConfigError(
            f"{identity} is the broker identity of {settings.username}, "
            f"but this device is {address}"
        )
    return replace(settings, host=host or settings.host, port=port or settings.port)


def _localise(broker: BrokerSettings, folder: Path) -> BrokerSettings:
    """Copy the broker identity's files into the device's folder (keys and password 0600)."""
    files = {"ca": broker.ca, "cert": broker.cert, "key": broker.key}
    files["password_file"] = broker.password_file
    copied: dict[str, Path | None] = {}
    for field_name, source in files.items():
        if source is None:
            copied[field_name] = None
            continue
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = folder / Path(source).name
        data = Path(source).read_bytes()
        if not target.exists() or target.read_bytes() != data:
            target.unlink(missing_ok=True)
            if field_name in ("ca", "cert"):
                write_atomically(target, data)
            else:
                write_secret(target, data)  # 0600 from the first byte
        copied[field_name] = target
    return replace(
        broker,
        ca=copied["ca"],
        cert=copied["cert"],
        key=copied["key"],
        password_file=copied["password_file"],
    )


def _relative(table: dict[str, Any], base: Path) -> dict[str, Any]:
    return {
        key: value.relative_to(base) if isinstance(value, Path) else value
        for key, value in table.items()
    }
