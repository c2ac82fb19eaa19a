"""The data commitment: a Merkle root of the readings trained on, one salt per leaf."""

from __future__ import annotations

import os

import pytest
from eth_utils import keccak
from harness import synthetic_readings

from truscl.agent.contribution import data_leaf, data_root, data_salt
from truscl.wire import merkle_proof, verify_proof


def test_each_leaf_has_its_own_salt_derived_from_the_round_secret() -> None:
    secret = os.urandom(32)

    salts = [data_salt(secret, i) for i in range(64)]

    assert len(set(salts)) == 64
    assert salts[5] == keccak(secret + (5).to_bytes(32, "big"))


def test_opening_one_leaf_does_not_let_a_sibling_be_tested_by_guessing() -> None:
    # Prepare: the device's window and root; a proof opens leaf 3 (its salt and its reading)
    secret, window = os.urandom(32), synthetic_readings(16)
    leaves = [data_leaf(secret, i, r) for i, r in enumerate(window)]
    root = data_root(secret, window)
    opened_salt = data_salt(secret, 3)

    # Execute: a verifier rebuilds the opened leaf; an attacker salts a perfect guess of
    # every other reading with the opened salt
    opened_leaf = keccak(opened_salt + window[3].encode())
    guesses = {keccak(opened_salt + r.encode()) for i, r in enumerate(window) if i != 3}

    # Assert
    assert verify_proof(opened_leaf, merkle_proof(leaves, opened_leaf), root)
    assert not guesses & set(leaves)


def test_the_same_secret_and_window_give_the_same_root_and_another_secret_another() -> None:
    # A rebuilt update (the agent restarted) reuses the round's kept secret: same commitment
    secret, window = os.urandom(32), synthetic_readings(32)

    assert data_root(secret, window) == data_root(bytes(secret), list(window))
    assert data_root(os.urandom(32), window) != data_root(secret, window)


def test_two_equal_readings_still_make_distinct_leaves() -> None:
    # With one salt per round these collided, and a Merkle tree refuses duplicate leaves
    reading = synthetic_readings(1)[0]

    root = data_root(os.urandom(32), [reading, reading])

    assert len(root) == 32


def test_a_round_secret_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        data_salt(b"short", 0)
