"""Configuration files of the server-side services: the task owner and the aggregator (TOML).

Checked strictly at start, like the agent's: an unknown key, a wrong type or a malformed address
stops the service with one line naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from truscl.config import ADDRESS, TASK, TomlReader
from truscl.errors import ProtocolError
from truscl.metrics import MetricsSettings
from truscl.mqtt import BrokerSettings
from truscl.wire.keyholders import check_holder_name

HE_MODES = ("threshold", "single-key")
OWNER_HOLDER = "owner"  # the owner's name as a key holder: its broker identity
MAX_WORKERS = 64  # aggregator processes of one task: more would only contend for the journal


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
    """``owner.toml``: who the owner is, where it keeps its state, and the task it creates.

    Threshold mode (the default) shares the CKKS key with the guardians named in
    ``[guardians]`` (broker identity = address); the task id is then fixed in the file
    (``task``), because each guardian's configuration names it before ``owner init`` runs.
    ``he_mode = "single-key"`` keeps the whole key with the owner, for small trials.
    """

    task_file: Path
    aggregator: str  # the address allowed to anchor the task's rounds
    key: Path  # the owner's Ethereum key (0600)
    state: Path  # HE key (or key share), the task's spec, released models
    broker: BrokerSettings
    chain: ChainSettings
    he_mode: str = "threshold"
    task: str | None = None  # chosen at random by `owner init` when absent (single-key only)
    guardians: tuple[tuple[str, str], ...] = ()  # (name, address), sorted by name
    metrics: MetricsSettings | None = None  # [metrics]: where to serve /metrics (absent: off)

    @classmethod
    def load(cls, path: Path) -> OwnerConfig:
        reader = TomlReader.load(path)
        owner = reader.table("owner")
        he_mode = reader.take(reader.data, "he_mode", str, "threshold")
        if he_mode not in HE_MODES:
            raise reader.fail(f"he_mode must be one of {list(HE_MODES)}")
        task = reader.take(reader.data, "task", str, None)
        if task is not None and not TASK.fullmatch(task):
            raise reader.fail("task must be 0x and 64 hex digits")
        table = reader.table("guardians")
        guardians = []
        for name in sorted(table):
            try:
                check_holder_name(name)
            except ProtocolError as exc:
                raise reader.fail(f"guardians.{name}: {exc}") from None
            if name == OWNER_HOLDER:
                raise reader.fail(f"guardians.{name}: the owner is a key holder already")
            guardians.append(
                (name, reader.pattern(table, f"guardians.{name}", ADDRESS, "an address"))
            )
        config = cls(
            task_file=reader.path(reader.data, "task_file"),
            aggregator=reader.pattern(reader.data, "aggregator", ADDRESS, "an address"),
            key=reader.path(owner, "owner.key"),
            state=reader.path(owner, "owner.state"),
            broker=reader.broker(),
            chain=ChainSettings.read(reader),
            he_mode=he_mode,
            task=None if task is None else task.lower(),
            guardians=tuple(guardians),
            metrics=MetricsSettings.read(reader),
        )
        reader.no_leftovers()
        if he_mode == "threshold" and (not guardians or task is None):
            raise reader.fail(
                "threshold mode (the default) needs task and at least one [guardians] entry; "
                'set he_mode = "single-key" to keep the whole key with the owner'
            )
        if he_mode == "single-key" and guardians:
            raise reader.fail("[guardians] share a threshold key: not in single-key mode")
        return config


@dataclass(frozen=True)
class GuardianConfig:
    """``guardian.toml``: a key guardian holds one share of a task's CKKS key and decrypts its
    part of each anchored aggregate, once per round; it names the task and the owner whose key
    generation it joins."""

    task: str
    owner: str  # the owner's address: it alone may call the key generation
    name: str  # its key-holder name, the broker identity it publishes under
    key: Path  # its Ethereum key (0600): signs its keygen messages and partials
    state: Path  # key share (0600), keygen record, one record per round it decrypted
    broker: BrokerSettings
    chain: ChainSettings

    @classmethod
    def load(cls, path: Path) -> GuardianConfig:
        reader = TomlReader.load(path)
        guardian = reader.table("guardian")
        name = reader.take(guardian, "guardian.name", str)
        try:
            check_holder_name(name)
        except ProtocolError as exc:
            raise reader.fail(f"guardian.name: {exc}") from None
        if name == OWNER_HOLDER:
            raise reader.fail(f"guardian.name must not be {OWNER_HOLDER!r}")
        config = cls(
            task=reader.pattern(reader.data, "task", TASK, "0x and 64 hex digits").lower(),
            owner=reader.pattern(reader.data, "owner", ADDRESS, "an address"),
            name=name,
            key=reader.path(guardian, "guardian.key"),
            state=reader.path(guardian, "guardian.state"),
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
    # [metrics]: where to serve /metrics and the status page at / (absent: off)
    metrics: MetricsSettings | None = None
    # [aggregator] workers: processes sharing the task's updates (server.aggregator.Shard)
    workers: int = 1

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
            metrics=MetricsSettings.read(reader, explorer=True),
            workers=reader.take(aggregator, "aggregator.workers", int, 1),
        )
        reader.no_leftovers()
        if config.expected_devices < 0:
            raise reader.fail("expected_devices must not be negative")
        if not 1 <= config.workers <= MAX_WORKERS:
            raise reader.fail(f"aggregator.workers must be from 1 to {MAX_WORKERS}")
        return config
