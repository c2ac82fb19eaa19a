"""The chain, seen from Python: a thin client for the ``Truscl`` contract and dev chains.

``ChainClient`` signs each role's transactions with that role's own key and speaks to any
web3 provider; ``EmbeddedChain`` is the in-process EVM the tests, the simulator and the demo
use; ``NodeChain`` is a development node (anvil) reached over JSON-RPC. ``deploy`` makes a
contract and its ``Deployment`` record, which anyone can check against the chain.
"""

from truscl.chain.client import GAS_LIMITS, ChainClient, RoundAnchor, TaskRecord
from truscl.chain.deployment import Deployment, deploy
from truscl.chain.dev import DevChain, EmbeddedChain, NodeChain

__all__ = [
    "GAS_LIMITS",
    "ChainClient",
    "Deployment",
    "DevChain",
    "EmbeddedChain",
    "NodeChain",
    "RoundAnchor",
    "TaskRecord",
    "deploy",
]
