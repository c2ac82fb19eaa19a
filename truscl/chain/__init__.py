"""The chain, seen from Python: a thin client for the ``Truscl`` contract and dev chains.

``ChainClient`` signs each role's transactions with that role's own key and speaks to any
web3 provider; ``EmbeddedChain`` is the in-process EVM the tests, the simulator and the demo
use; ``NodeChain`` is a development node (anvil) reached over JSON-RPC.
"""

from truscl.chain.client import GAS_LIMITS, ChainClient, RoundAnchor, TaskRecord
from truscl.chain.dev import DevChain, EmbeddedChain, NodeChain

__all__ = [
    "GAS_LIMITS",
    "ChainClient",
    "DevChain",
    "EmbeddedChain",
    "NodeChain",
    "RoundAnchor",
    "TaskRecord",
]
