"""The agent's TOML configuration: a good file loads, every mistake is named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from truscl.agent.config import AgentConfig
from truscl.agent.provision import provision_agent
from truscl.config import broker_table
from truscl.errors import ConfigError
from truscl.mqtt import BrokerSettings

GOOD = """
task = "0x{task}"

[device]
key = "/var/lib/truscl/device.key"
state = "/var/lib/truscl"
name = "kitchen"

[broker]
host = "broker.lan"
port = 8883

[chain]
rpc = "http://127.0.0.1:8545"
contract = "0x{contract}"

[sensors]
hardware = "pi"
interval = 60
pir_pin = 17
bme280_address = 0x77
""".format(task="ab" * 32, contract="12" * 20)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_defaults_for_the_rest(tmp_path: Path) -> None:
    config = AgentConfig.load(write(tmp_path, GOOD))

    assert config.task == "0x" + "ab" * 32
    assert config.broker.port == 8883 and config.broker.ca is None
    assert config.broker.keepalive == 30
    longer = AgentConfig.load(
        write(tmp_path, GOOD.replace("port = 8883", "port = 8883\nkeepalive = 120"))
    )
    assert longer.broker.keepalive == 120
    assert broker_table(longer.broker)["keepalive"] == 120
    assert broker_table(config.broker)["keepalive"] is None  # the default is not written
    assert config.interval == 60.0
    assert config.wiring.pir_pin == 17 and config.wiring.bme280_address == 0x77
    assert config.wiring.light_channel == 0 and config.i2c_bus == 1
    assert config.hardware == "pi" and config.time_scale == 1.0
    assert config.parts == ("bme280", "light", "co2", "pir")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.replace("port = 8883", 'port = "8883"'), "broker.port has the wrong type"),
        (lambda t: t.replace("port = 8883", "port = 70000"), "broker.port must be a TCP port"),
        (lambda t: t.replace("port = 8883", "port = 1\nkeepalive = 2"), "keepalive must be 5"),
        (lambda t: t.replace("port = 8883", 'port = 1\nkeepalive = "9"'), "keepalive has the"),
        (lambda t: t.replace("interval = 60", 'colour = "red"'), "unknown key sensors.colour"),
        (lambda t: t.replace('hardware = "pi"', 'hardware = "pc"'), "sensors.hardware"),
        (lambda t: t.replace("interval = 60", "interval = 0"), "must be > 0"),
        (lambda t: t.replace('rpc = "http://127.0.0.1:8545"\n', ""), "chain.rpc is required"),
        (lambda t: t.replace('"0x' + "12" * 20, '"0x12'), "chain.contract must be an address"),
        (lambda t: t.replace("task = ", "job = "), "task is required"),
        (lambda t: t + "\nextra = 1\n", "unknown key"),
        (lambda t: "broker = 3\n" + t.replace("[broker]", "[old]"), "[broker] must be a table"),
        (lambda t: t.replace("[chain]", "[chain"), "not valid TOML"),
        (lambda t: t.replace("interval = 60", "interval = true"), "wrong type"),
        (lambda t: t.replace("interval = 60", 'parts = ["co2", "sht31"]'), "sensors.parts may"),
        (lambda t: t.replace("interval = 60", "parts = [[1]]"), "sensors.parts may only name"),
    ],
)
def test_every_mistake_is_named(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        AgentConfig.load(write(tmp_path, change(GOOD)))


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        AgentConfig.load(tmp_path / "missing.toml")
    binary = tmp_path / "agent.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid TOML"):
        AgentConfig.load(binary)


ROOT = Path(__file__).resolve().parents[1]


def test_the_example_config_loads() -> None:
    config = AgentConfig.load(ROOT / "deploy" / "agent.toml")

    assert config.hardware == "pi" and config.interval == 300.0


def test_the_systemd_unit_runs_the_agent_with_this_config() -> None:
    # systemd-analyze verify and security for every unit: tests/test_units.py
    unit = (ROOT / "systemd" / "truscl-agent.service").read_text()
    assert "truscl --log-level INFO agent run --config /etc/truscl/agent.toml" in unit


def test_a_provisioned_device_keeps_its_broker_identity_and_keepalive(tmp_path: Path) -> None:
    # Prepare: a broker identity with files, as `truscl broker provision` hands them out
    files = {name: tmp_path / "identity" / name for name in ("ca.crt", "password")}
    for path in files.values():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    identity = BrokerSettings(
        "broker.lan",
        8883,
        ca=files["ca.crt"],
        username="device",
        password_file=files["password"],
        keepalive=120,
    )

    # Execute
    device = provision_agent(tmp_path / "device", broker=identity, rpc="http://127.0.0.1:8545")
    config = AgentConfig.load(device.config)

    # Assert: the files copied beside the config, every other setting as given
    assert config.broker == replace(
        identity,
        ca=tmp_path / "device" / "broker" / "ca.crt",
        password_file=tmp_path / "device" / "broker" / "password",
    )
