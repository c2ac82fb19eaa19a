"""An in-process EVM for tests, the simulator and the demo: no node, no network, no Node.js."""

from __future__ import annotations

import threading

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from web3 import EthereumTesterProvider, Web3
from web3.types import Wei


class EmbeddedChain:
    """py-evm behind eth-tester, with pre-funded accounts that pay for the roles' gas.

    Devices, aggregator and owner share one instance across threads; eth-tester is not
    thread-safe, so every client of this chain must take ``lock`` (``ChainClient`` does when it
    is given it). Blocks are mined on every transaction.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._tester = EthereumTester(backend=PyEVMBackend())
        self._w3 = Web3(EthereumTesterProvider(self._tester))
        self._faucet = self._w3.eth.accounts[0]

    def web3(self) -> Web3:
        return self._w3

    def fund(self, address: str, wei: int) -> str:
        """Send ``wei`` from a pre-funded tester account; returns the transaction hash."""
        with self.lock:
            tx_hash = self._w3.eth.send_transaction(
                {"from": self._faucet, "to": Web3.to_checksum_address(address), "value": Wei(wei)}
            )
            self._w3.eth.wait_for_transaction_receipt(tx_hash)
        return tx_hash.to_0x_hex()

    def new_account(self, wei: int = 10**18) -> LocalAccount:
        """A fresh key with ``wei`` to pay gas: one per role, as on a real chain."""
        account: LocalAccount = Account.create()
        self.fund(account.address, wei)
        return account
