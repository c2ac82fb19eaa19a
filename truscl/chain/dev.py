"""Development chains: the in-process EVM, or a local node such as anvil.

Both have a first account that is unlocked and funded; it pays for the roles' gas, as a faucet
would on a test network. Each role still signs its own transactions with its own key.
"""

from __future__ import annotations

import threading

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import EthereumTesterProvider, Web3
from web3.types import Wei

from truscl.chain.client import ChainClient
from truscl.chain.rpc import connect
from truscl.errors import ChainError


class DevChain:
    """A chain with an unlocked, funded first account.

    Devices, aggregator and owner share one instance across threads, so every client of it
    takes ``lock`` (``ChainClient`` does when it is given it): eth-tester is not thread-safe,
    and on a node the lock keeps each account's nonces in order.
    """

    def __init__(self, w3: Web3) -> None:
        self.lock = threading.RLock()
        self._w3 = w3
        accounts = w3.eth.accounts
        if not accounts:
            raise ChainError("the chain has no unlocked account to pay for gas")
        self._faucet = accounts[0]

    def web3(self) -> Web3:
        return self._w3

    def fund(self, address: str, wei: int) -> str:
        """Send ``wei`` from the unlocked account; returns the transaction hash."""
        with self.lock:
            tx_hash = self._w3.eth.send_transaction(
                {"from": self._faucet, "to": Web3.to_checksum_address(address), "value": Wei(wei)}
            )
            self._w3.eth.wait_for_transaction_receipt(tx_hash)
        return tx_hash.to_0x_hex()

    def client(self, contract: str, account: LocalAccount | None = None) -> ChainClient:
        """A role's client of the contract at ``contract`` (read-only without an account)."""
        return ChainClient.at(self._w3, contract, account, self.lock)

    def new_account(self, wei: int = 10**18) -> LocalAccount:
        """A fresh key with ``wei`` to pay gas: one per role, as on a real chain."""
        account: LocalAccount = Account.create()
        self.fund(account.address, wei)
        return account


class EmbeddedChain(DevChain):
    """py-evm behind eth-tester: no node, no network, no Node.js. Blocks are mined per tx."""

    def __init__(self) -> None:
        from eth_tester import EthereumTester, PyEVMBackend

        super().__init__(Web3(EthereumTesterProvider(EthereumTester(backend=PyEVMBackend()))))


class NodeChain(DevChain):
    """A development node over JSON-RPC (anvil, or geth --dev)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        super().__init__(connect(url, timeout))
