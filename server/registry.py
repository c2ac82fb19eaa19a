"""The device registry as the aggregator sees it: a cache filled from ``DeviceRegistered`` events.

Asking the contract ``isDevice`` for every update lets anyone who can publish on the broker make
the aggregator spend one node round trip per message (and a public provider's rate limit with
it). The contract never unregisters a device, so its events from the deployment block on are the
whole registry: the cache scans them once, then only the blocks added since, at most every
``refresh_s`` seconds. A key that is not in the cache costs a set look-up until the next refresh
is due. A device registered moments ago may be refused once within that window; it is in after
the next refresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from truscl.chain import ChainClient

REFRESH_S = 5.0


class RegistryCache:
    """``known(device)``: True or False, or ``ChainError`` when the cache is stale and the node
    cannot be read (the caller waits rather than refuse a device it cannot check)."""

    def __init__(
        self,
        chain: ChainClient,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._chain = chain
        self._refresh_s = refresh_s
        self._clock = clock
        self._devices: set[str] = set()
        self._next_block: int | None = None  # first block not scanned yet
        self._refreshed_at: float | None = None

    def known(self, device: str) -> bool:
        device = device.lower()  # cheaper than a checksum (a keccak) and as exact
        if device in self._devices:
            return True
        now = self._clock()
        if self._refreshed_at is None or now - self._refreshed_at >= self._refresh_s:
            self.refresh()
        return device in self._devices

    def refresh(self) -> None:
        """Scan the blocks added since the last scan (all of them, the first time)."""
        start = self._next_block
        if start is None:
            start = self._chain.deployment_block()
        head = self._chain.block_number()
        if head >= start:
            self._devices.update(d.lower() for d in self._chain.registered_devices(start, head))
        self._next_block = max(start, head + 1)
        self._refreshed_at = self._clock()

    def __len__(self) -> int:
        return len(self._devices)
