"""truscl.hashing's keccak against eth-hash's, the library the chain tooling uses: an upgrade
of either that changed a digest would change every blob id, leaf and signature."""

import os

import pytest
from eth_hash.backends import pycryptodome

from truscl.hashing import keccak

REFERENCE = pycryptodome.CryptodomeBackend()


@pytest.mark.parametrize("size", [0, 1, 31, 32, 135, 136, 137, 4096, 131_632])
def test_keccak_is_eth_hash_keccak(size: int) -> None:
    data = os.urandom(size)
    assert keccak(data) == REFERENCE.keccak256(data)


def test_keccak_of_the_empty_string_is_the_chain_s() -> None:
    # the EVM's keccak256("") (the code hash of an account without code)
    empty = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keccak(b"").hex() == empty


def test_keccak_is_the_fast_one() -> None:
    from sha3 import keccak_256

    assert keccak(b"truscl") == keccak_256(b"truscl").digest()
