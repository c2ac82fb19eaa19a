"""Fixtures shared across the suite: CKKS keys are slow to make, so one set per session.

The server's and the chain's modules are imported where they are used, so that the agent's
tests also run where only the agent is installed (scripts/arm64, a Pi's userland).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import tenseal as ts

from truscl.errors import ConfigError
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
