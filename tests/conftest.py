"""Fixtures shared across the suite: CKKS keys are slow to make, so one set per session."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tenseal as ts

from truscl.broker import Mosquitto, free_port
from truscl.chain import DevChain
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


ANVIL = Path(__file__).resolve().parents[1] / "contracts" / "node_modules" / ".bin" / "anvil"


@pytest.fixture()
def anvil() -> Iterator[str]:
    if not ANVIL.exists():
        pytest.skip("anvil is not installed: run `npm ci` in contracts/ (scripts/test does)")
    port = free_port()
    process = subprocess.Popen(
        [str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--silent"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("anvil did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
