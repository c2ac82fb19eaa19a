"""A device's DP noise comes from a fresh OS-seeded generator per round (per update it makes)."""

from __future__ import annotations

import numpy as np
import tenseal as ts
from eth_account import Account
from harness import synthetic_readings

from truscl.agent.contribution import UpdateInputs, make_update
from truscl.demo import occupancy_spec
from truscl.privacy.ckks import OwnerKeys, context_hash, decrypt
from truscl.task import DpTerms
from truscl.wire import Domain


def test_each_update_draws_its_noise_from_its_own_generator(
    owner_keys: OwnerKeys, public_context: ts.Context
) -> None:
    # Prepare: the same model, window and terms, as two rounds with an unchanged model would be
    spec = occupancy_spec(
        "0x" + context_hash(owner_keys.public_context_bytes()).hex(),
        window=128,
        dp=DpTerms(batch_size=16),
    )
    account, domain = Account.create(), Domain(31337, "0x" + "11" * 20)
    inputs = UpdateInputs(2, np.zeros(spec.n_params), synthetic_readings(128), 1.0, b"\x07" * 32)

    def delta(rng: np.random.Generator | None) -> np.ndarray:
        update = make_update(
            spec, inputs, context=public_context, account=account, domain=domain, rng=rng
        )
        return decrypt(owner_keys, update.ciphertext, spec.n_params)

    # Execute: twice with the default (what the device does each round), twice seeded alike
    fresh = [delta(None), delta(None)]
    seeded = [delta(np.random.default_rng(3)), delta(np.random.default_rng(3))]

    # Assert: alike seeds give the same delta (up to CKKS's own noise), so the difference
    # between the default's two is the noise of two different generators
    assert np.allclose(seeded[0], seeded[1], atol=1e-5)
    assert np.max(np.abs(fresh[0] - fresh[1])) > 1e-3
