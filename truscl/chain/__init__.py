"""The chain, seen from Python: a thin client for the ``Truscl`` contract and dev chains.

``ChainClient`` signs each role's transactions with that role's own key and speaks to any
web3 provider; ``EmbeddedChain`` is the in-process EVM the tests, the simulator and the demo
use; ``NodeChain`` is a development node (anvil) reached over JSON-RPC. ``deploy`` makes a
contract and its ``Deployment`` record, which anyone can check against the chain. A device
reads through ``RpcReader`` (``eth_call`` without web3), behind the ``ChainReader`` interface
that ``ChainClient`` offers too.

The names are loaded on first use, so that ``truscl.chain.reader`` can be imported on a device
without web3 coming along.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from truscl.chain.client import GAS_LIMITS, ChainClient, RoundAnchor
    from truscl.chain.deployment import Deployment, deploy
    from truscl.chain.dev import DevChain, EmbeddedChain, NodeChain
    from truscl.chain.reader import ChainReader, RpcReader, TaskRecord

_MODULES = {
    "GAS_LIMITS": "client",
    "ChainClient": "client",
    "RoundAnchor": "client",
    "Deployment": "deployment",
    "deploy": "deployment",
    "DevChain": "dev",
    "EmbeddedChain": "dev",
    "NodeChain": "dev",
    "ChainReader": "reader",
    "RpcReader": "reader",
    "TaskRecord": "reader",
}

__all__ = [
    "GAS_LIMITS",
    "ChainClient",
    "ChainReader",
    "Deployment",
    "DevChain",
    "EmbeddedChain",
    "NodeChain",
    "RoundAnchor",
    "RpcReader",
    "TaskRecord",
    "deploy",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
