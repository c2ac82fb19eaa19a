"""Fixtures shared across the suite: CKKS keys are slow to make, so one set per session.

The server's and the chain's modules are imported where they are used, so that the agent's
tests also run where only the agent is installed (scripts/arm64, a Pi's userland).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tenseal as ts

from truscl.config import TomlReader
from truscl.errors import ConfigError
from truscl.mqtt import BrokerSettings
from truscl.privacy.ckks import OwnerKeys, load_context

if TYPE_CHECKING:
    from truscl.broker import Mosquitto
    from truscl.chain import DevChain
    from truscl.server.owner import TaskOwner


def task_owner(chain: DevChain, contract: str, keys: OwnerKeys, broker: Mosquitto) -> TaskOwner:
    """The task owner's role on ``chain``, with an account of its own, talking to ``broker``."""
    from truscl.server.owner import TaskOwner

    client = chain.client(contract, chain.new_account())
    return TaskOwner(keys=keys, chain=client, broker=broker.settings)


# A provisioned broker already running (the folder `truscl broker provision --out` wrote, or a
# copy of its clients/ folder), which the `provisioned_broker` fixture hands out instead of
# starting one: scripts/arm64 runs it on the host for the tests in the emulated userland.
SHARED_BROKER = "TRUSCL_TEST_BROKER"


@dataclass(frozen=True)
class BrokerLogins:
    """A provisioned broker, through its clients' folders (``clients/<identity>``)."""

    folder: Path

    def settings(self, identity: str) -> BrokerSettings:
        """How ``identity`` reaches the broker: its ``broker.toml``, as its role reads it."""
        return TomlReader.load(self.folder / "clients" / identity / "broker.toml").broker()

    @property
    def devices(self) -> list[str]:
        """The devices' identities: their addresses."""
        clients = (self.folder / "clients").iterdir()
        return sorted(p.name for p in clients if p.name.startswith("0x"))


@pytest.fixture()
def provisioned_broker(tmp_path: Path) -> Iterator[BrokerLogins]:
    """A broker with TLS, a login per identity (two for the aggregator: it may run as two
    worker processes) and the ACL, for two devices: the one named in
    $TRUSCL_TEST_BROKER when set (it may be shared: use a task of the test's own), else one
    provisioned and started here."""
    shared = os.environ.get(SHARED_BROKER)
    if shared:
        yield BrokerLogins(Path(shared))
        return
    from truscl.broker import Mosquitto, free_port
    from truscl.broker.provision import provision_broker  # the server extra's cryptography

    devices = ["0x" + "aa" * 20, "0x" + "bb" * 20]
    done = provision_broker(
        tmp_path / "broker", devices, port=free_port(), bind="127.0.0.1", aggregator_workers=2
    )
    with Mosquitto.provisioned(done.conf):
        yield BrokerLogins(done.out)


@pytest.fixture(scope="session")
def owner_keys() -> OwnerKeys:
    return OwnerKeys.generate()


@pytest.fixture(scope="session")
def public_context(owner_keys: OwnerKeys) -> ts.Context:
    return load_context(owner_keys.public_context_bytes())


@pytest.fixture()
def anvil() -> Iterator[str]:
    from truscl.chain.anvil import Anvil, find_anvil

    try:
        find_anvil()
    except ConfigError:
        pytest.skip("anvil is not installed: run `npm ci` in contracts/ (scripts/test does)")
    with Anvil() as node:
        yield node.url


@dataclass(frozen=True)
class FleetRun:
    """A finished ``truscl --log-format json demo`` whose chain is still up."""

    workdir: Path
    rpc: str
    stdout: str
    stderr: str
    summary: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.summary["task"])


@pytest.fixture(scope="session")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetRun]:
    """One short demo, each role its own process, for the report, metrics and status page
    tests: on an anvil of the session's, so that its chain outlives the demo."""
    from truscl.chain.anvil import Anvil, find_anvil

    try:
        find_anvil()
    except ConfigError:
        pytest.skip("anvil is not installed: run `npm ci` in contracts/ (scripts/test does)")
    folder = tmp_path_factory.mktemp("fleet")
    with Anvil() as node:
        result = subprocess.run(
            [sys.executable, "-m", "truscl.cli", "--log-format", "json", "demo",
             "--devices", "2", "--rounds", "2", "--workdir", str(folder / "work"),
             "--rpc", node.url, "--json", str(folder / "summary.json")],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        yield FleetRun(
            folder / "work",
            node.url,
            result.stdout,
            result.stderr,
            json.loads((folder / "summary.json").read_text()),
        )
