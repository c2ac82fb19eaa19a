"""The release bounds: an honest sum passes with room to spare, a crafted one does not."""

from __future__ import annotations

import numpy as np
from test_guardian import crafted_ciphertext

from truscl.privacy.ckks import (
    DEFAULT_PROFILE,
    PROFILES,
    OwnerKeys,
    encrypt,
    load_context,
    sum_ciphertexts,
)
from truscl.privacy.release import Refusal, ReleaseBounds, noise_slack
from truscl.privacy.threshold import KeyShare, combine_slots

N_PARAMS = 5


def slots_of(owner_keys: OwnerKeys, ciphertext: bytes, size: int = N_PARAMS) -> np.ndarray:
    """Single-key mode's decryption: the whole key as a one-holder share, every slot."""
    share = KeyShare.from_context("owner", owner_keys.context)
    partial = share.partial_decrypt(owner_keys.context, ciphertext, size)
    return combine_slots(owner_keys.context, ciphertext, size, [partial], ["owner"])


def bounds(updates: int, holders: int = 1, n_params: int = N_PARAMS) -> ReleaseBounds:
    return ReleaseBounds(n_params, updates, 5.0, noise_slack(DEFAULT_PROFILE, holders))


def test_the_slack_is_the_documented_figure() -> None:
    # 16 standard deviations of sqrt(k) holders' smudging (4.3e-5 each) plus 1e-6
    assert abs(noise_slack(DEFAULT_PROFILE, 2) - 9.78e-4) < 1e-6
    assert abs(noise_slack(DEFAULT_PROFILE, 1) - 6.92e-4) < 1e-6


def test_an_honest_sum_at_the_clip_is_released(owner_keys: OwnerKeys) -> None:
    # Prepare: three updates each at the L2 clip, all in one slot (the worst case for a slot)
    context = load_context(owner_keys.public_context_bytes())
    update = np.zeros(N_PARAMS)
    update[2] = 5.0
    total = sum_ciphertexts(context, [encrypt(context, update) for _ in range(3)], N_PARAMS)

    # Execute / Assert
    assert bounds(updates=3).check(slots_of(owner_keys, total)) is None
    assert bounds(updates=2).check(slots_of(owner_keys, total)) == Refusal.OUT_OF_BOUNDS


def test_a_long_vector_over_two_ciphertexts_is_released(owner_keys: OwnerKeys) -> None:
    context = load_context(owner_keys.public_context_bytes())
    values = np.full(5000, 0.05)
    slots = slots_of(owner_keys, encrypt(context, values), 5000)

    assert slots.shape == (2, 4096)
    assert bounds(updates=1, n_params=5000).check(slots) is None


def test_an_l2_norm_above_the_clip_is_refused(owner_keys: OwnerKeys) -> None:
    context = load_context(owner_keys.public_context_bytes())
    spread = np.full(N_PARAMS, 4.0)  # every slot under 5, the norm 8.9 over it

    assert bounds(updates=1).check(slots_of(owner_keys, encrypt(context, spread))) == (
        Refusal.OUT_OF_BOUNDS
    )


def test_the_crafted_ciphertext_is_refused(owner_keys: OwnerKeys) -> None:
    context = load_context(owner_keys.public_context_bytes())
    evil = crafted_ciphertext(context, np.full(N_PARAMS, 0.5))
    honest = [encrypt(context, np.full(N_PARAMS, 0.5)) for _ in range(2)]
    total = sum_ciphertexts(context, [evil, *honest], N_PARAMS)

    assert bounds(updates=3).check(slots_of(owner_keys, total)) == Refusal.OUT_OF_BOUNDS


def test_values_beyond_the_model_that_are_not_zero_are_refused(owner_keys: OwnerKeys) -> None:
    # Values within bounds, but a value beyond the model's carries something: an update
    # encrypted as a full vector rather than the model's five values
    context = load_context(owner_keys.public_context_bytes())
    full = np.zeros(4096)
    full[:N_PARAMS] = 0.5
    full[1001] = 0.01  # an imaginary part
    slots = slots_of(owner_keys, encrypt(context, full), 4096)

    assert bounds(updates=1).check(slots) == Refusal.PADDING
    assert bounds(updates=1).check(slots_of(owner_keys, encrypt(context, full[:5]))) is None


def test_the_compact_profile_releases_an_honest_sum_and_refuses_a_crafted_one() -> None:
    # Prepare: single-key mode under ckks-4096-40-40 (scale 2^26, smudging sigma 2^12)
    compact = PROFILES["ckks-4096-40-40"]
    owner_keys = OwnerKeys.generate(compact)
    context = load_context(owner_keys.public_context_bytes())
    update = np.zeros(N_PARAMS)
    update[2] = 5.0
    honest = [encrypt(context, update) for _ in range(3)]
    evil = crafted_ciphertext(context, np.full(N_PARAMS, 0.5), offset=2**37)
    compact_bounds = ReleaseBounds(N_PARAMS, 3, 5.0, noise_slack(compact, 1))

    # Execute
    released = slots_of(owner_keys, sum_ciphertexts(context, honest, N_PARAMS))
    crafted = slots_of(owner_keys, sum_ciphertexts(context, [evil, *honest[1:]], N_PARAMS))

    # Assert: the release is within the profile's slack of the truth; the crafted sum is refused
    assert compact_bounds.check(released) is None
    np.testing.assert_allclose(
        released.reshape(-1)[:N_PARAMS], 3 * update, atol=compact_bounds.slack
    )
    assert compact_bounds.check(crafted) == Refusal.OUT_OF_BOUNDS
