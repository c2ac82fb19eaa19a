"""Reaching a chain node over JSON-RPC, with failures that say which node and why."""

from __future__ import annotations

from web3 import Web3

from truscl.errors import ChainError


def connect(url: str, timeout: float = 10.0) -> Web3:
    """A web3 client of the node at ``url``; ``ChainError`` when nothing answers there."""
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
    try:
        connected = w3.is_connected()
    except Exception as exc:  # requests and web3 raise many types for a bad URL or host
        raise ChainError(f"no JSON-RPC node answers at {url}: {exc}") from None
    if not connected:
        raise ChainError(f"no JSON-RPC node answers at {url}")
    return w3
