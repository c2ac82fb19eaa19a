"""The chain, seen from Python: a thin client for the ``Truscl`` contract and an embedded EVM.

``ChainClient`` signs each role's transactions with that role's own key and speaks to any
web3 provider; ``EmbeddedChain`` is the in-process EVM the tests, the simulator and the demo use.
"""

from truscl.chain.client import GAS_LIMITS, ChainClient, RoundAnchor, TaskRecord
from truscl.chain.embedded import EmbeddedChain

__all__ = ["GAS_LIMITS", "ChainClient", "EmbeddedChain", "RoundAnchor", "TaskRecord"]
