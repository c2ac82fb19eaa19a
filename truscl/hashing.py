"""keccak-256, the chain's hash, as fast as this machine has it.

Every role hashes in its hot path: a device builds a Merkle tree over its window of readings
each round (thousands of short inputs), the aggregator hashes every update blob and its
ciphertext (about 130 kB each, a thousand a second). safe-pysha3's C keccak (a base
requirement) costs about 1 us for a short input against about 7 us through eth-hash, whose
pycryptodome backend pays most of that in per-call overhead, and about two thirds of
eth-hash's time on an update blob; it also releases the GIL on long inputs, so that the
aggregator's threads hash in parallel. eth-hash stays the fallback where safe-pysha3 is not
installed; ``tests/test_hashing.py`` holds the two to the same digests.
"""

from __future__ import annotations

from collections.abc import Callable


def _fastest() -> Callable[[bytes], bytes]:
    try:
        from sha3 import keccak_256
    except ImportError:
        from eth_hash.auto import keccak as eth_keccak

        return eth_keccak
    return lambda data: keccak_256(data).digest()


keccak: Callable[[bytes], bytes] = _fastest()
