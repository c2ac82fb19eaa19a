"""Fixtures shared across the suite: CKKS keys are slow to make, so one set per session."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tenseal as ts

from truscl.broker import Mosquitto
from truscl.chain import DevChain
from truscl.chain.anvil import Anvil, find_anvil
from truscl.errors import ConfigError
from truscl.privacy.ckks import OwnerKeys, load_context
from truscl.server.owner import TaskOwner


def task_owner(chain: DevChain, contract: str, keys: OwnerKeys, broker: Mosquitto) -> TaskOwner:
    """The task owner's role on ``chain``, with an account of its own, talking to ``broker``."""
    client = chain.client(contract, chain.new_account())
    return TaskOwner(keys=keys, chain=client, broker=broker.settings)


@pytest.fixture(scope="session")
def owner_keys() -> OwnerKeys:
    return OwnerKeys.generate()


@pytest.fixture(scope="session")
def public_context(owner_keys: OwnerKeys) -> ts.Context:
    return load_context(owner_keys.public_context_bytes())


@pytest.fixture()
def anvil() -> Iterator[str]:
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
