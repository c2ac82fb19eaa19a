"""Merkle tree over keccak-256 leaves, compatible with OpenZeppelin's ``MerkleProof``.

Pairs are hashed in sorted order (``keccak(min(a, b) ++ max(a, b))``), so a proof is a plain
list of sibling hashes and verification needs no left/right flags; the contract verifies the
same proofs with ``MerkleProof.verify``. Leaves are sorted before the tree is built, so the root
does not depend on the order in which updates arrived (nor on how workers split the load).

A device builds one tree over its window of readings every round (864 leaves by default, each
itself two hashes), so the hash is called thousands of times: it is :func:`truscl.hashing.keccak`.
"""

from __future__ import annotations

from collections.abc import Sequence

from truscl.errors import ProtocolError
from truscl.hashing import keccak

EMPTY_ROOT = b"\x00" * 32


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def _check(leaves: Sequence[bytes]) -> list[bytes]:
    for leaf in leaves:
        if len(leaf) != 32:
            raise ProtocolError(f"a Merkle leaf is 32 bytes, got {len(leaf)}")
    if len(set(leaves)) != len(leaves):
        raise ProtocolError("duplicate Merkle leaf")
    return sorted(leaves)


def _layers(leaves: Sequence[bytes]) -> list[list[bytes]]:
    layers = [_check(leaves)]
    while len(layers[-1]) > 1:
        level = layers[-1]
        nxt = [hash_pair(a, b) for a, b in zip(level[0::2], level[1::2], strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])  # an odd node moves up unchanged
        layers.append(nxt)
    return layers


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of the sorted leaves; ``EMPTY_ROOT`` for none."""
    if not leaves:
        return EMPTY_ROOT
    return _layers(leaves)[-1][0]


def merkle_proof(leaves: Sequence[bytes], leaf: bytes) -> list[bytes]:
    """Sibling hashes from ``leaf`` up to the root."""
    layers = _layers(leaves)
    try:
        index = layers[0].index(leaf)
    except ValueError:
        raise ProtocolError("leaf is not in the tree") from None
    return _proof(layers, index)


def merkle_proofs(leaves: Sequence[bytes]) -> dict[bytes, list[bytes]]:
    """Every leaf's proof, from one tree (a proof each through ``merkle_proof`` would build
    the tree once per leaf: quadratic in a round of a thousand devices)."""
    layers = _layers(leaves)
    return {leaf: _proof(layers, index) for index, leaf in enumerate(layers[0])}


def _proof(layers: list[list[bytes]], index: int) -> list[bytes]:
    proof = []
    for level in layers[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        index //= 2
    return proof


def verify_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root
