"""Fixtures shared across the suite: CKKS keys are slow to make, so one set per session."""

from __future__ import annotations

from collections.abc import Iterator

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
