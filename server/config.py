"""Configuration files of the server-side services: the task owner and the aggregator (TOML).

Checked strictly at start, like the agent's: an unknown key, a wrong type or a malformed address
stops the service with one line naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from truscl.config import ADDRESS, TASK, TomlReader
from truscl.mqtt import BrokerSettings


@dataclass(frozen=True)
class ChainSettings:
    rpc: str
    contract: str

    @classmethod
    def read(cls, reader: TomlReader) -> ChainSettings:
        chain = reader.table("chain")
        return cls(
            rpc=reader.take(chain, "chain.rpc", str),
            contract=reader.pattern(chain, "chain.contract", ADDRESS, "an address"),
        )


@dataclass(frozen=True)
class OwnerConfig:
    """``owner.toml``: who the owner is, where it keeps its state, and the task it creates."""

    task_file: Path
    aggregator: str  # the address allowed to anchor the task's rounds
    key: Path  # the owner's Ethereum key (0600)
    state: Path  # HE secret key, the task's spec, released models
    broker: BrokerSettings
    chain: ChainSettings

    @classmethod
    def load(cls, path: Path) -> OwnerConfig:
        reader = TomlReader.load(path)
        owner = reader.table("owner")
        config = cls(
            task_file=reader.path(reader.data, "task_file"),
            aggregator=reader.pattern(reader.data, "aggregator", ADDRESS, "an address"),
            key=reader.path(owner, "owner.key"),
            state=reader.path(owner, "owner.state"),
            broker=reader.broker(),
            chain=ChainSettings.read(reader),
        )
        reader.no_leftovers()
        return config


@dataclass(frozen=True)
class AggregatorConfig:
    """``aggregator.toml``: the task it serves, its chain key, its archive."""

    task: str
    expected_devices: int  # a round closes as soon as this many are in (0: at its deadline)
    key: Path
    archive: Path
    broker: BrokerSettings
    chain: ChainSettings

    @classmethod
    def load(cls, path: Path) -> AggregatorConfig:
        reader = TomlReader.load(path)
        aggregator = reader.table("aggregator")
        config = cls(
            task=reader.pattern(reader.data, "task", TASK, "0x and 64 hex digits").lower(),
            expected_devices=reader.take(reader.data, "expected_devices", int, 0),
            key=reader.path(aggregator, "aggregator.key"),
            archive=reader.path(aggregator, "aggregator.archive"),
            broker=reader.broker(),
            chain=ChainSettings.read(reader),
        )
        reader.no_leftovers()
        if config.expected_devices < 0:
            raise reader.fail("expected_devices must not be negative")
        return config
