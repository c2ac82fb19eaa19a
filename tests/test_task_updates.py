"""Updates for a task's own features and model: the device's inputs follow the task, and the
parameter count carries through encryption, the sum, the decryption and the release bounds."""

from __future__ import annotations

import numpy as np
import tenseal as ts
from eth_account import Account
from harness import synthetic_readings

from truscl.agent.contribution import UpdateInputs, make_update
from truscl.demo import occupancy_spec
from truscl.learning.features import FEATURES
from truscl.privacy.ckks import DEFAULT_PROFILE, OwnerKeys, context_hash, sum_ciphertexts
from truscl.privacy.dp import secure_generator
from truscl.privacy.release import ReleaseBounds, noise_slack
from truscl.privacy.threshold import KeyShare, combine, combine_slots
from truscl.server.owner_service import initial_model
from truscl.task import DpTerms, TaskSpec
from truscl.wire import Domain, Update
from truscl.wire.model import model_bytes, model_from_bytes

DOMAIN = Domain(31337, "0x" + "11" * 20)


def spec_with(owner_keys: OwnerKeys, features: tuple[str, ...], **terms: object) -> TaskSpec:
    ranges = [FEATURES[name].natural_range or (0.0, 1000.0) for name in features]
    return occupancy_spec(
        "0x" + context_hash(owner_keys.public_context_bytes()).hex(),
        features=features,
        feature_offsets=tuple((lo + hi) / 2 for lo, hi in ranges),
        feature_scales=tuple((hi - lo) / 2 for lo, hi in ranges),
        window=128,
        min_readings=64,
        dp=DpTerms(batch_size=16),
        **terms,
    )


def update_for(
    spec: TaskSpec, context: ts.Context, params: np.ndarray, readings: int = 100
) -> Update:
    inputs = UpdateInputs(
        round=1,
        params=params,
        window=synthetic_readings(readings),
        epsilon_spent=1.0,
        data_root=b"\x07" * 32,
    )
    account = Account.create()
    return make_update(
        spec, inputs, context=context, account=account, domain=DOMAIN, rng=secure_generator()
    )


def decrypted(owner_keys: OwnerKeys, ciphertext: bytes, n_params: int) -> np.ndarray:
    """The owner's path in single-key mode: its whole key as a one-holder share."""
    share = KeyShare.from_context("owner", owner_keys.context)
    partial = share.partial_decrypt(owner_keys.context, ciphertext, n_params)
    return combine(owner_keys.context, ciphertext, n_params, [partial], ["owner"])


def test_a_three_feature_task_trains_on_its_three_inputs(
    owner_keys: OwnerKeys, public_context: ts.Context
) -> None:
    # Prepare
    spec = spec_with(owner_keys, ("light_lux", "co2_ppm", "hour_sin"))
    # Execute: on 100 readings, between min_readings and the window
    update = update_for(spec, public_context, initial_model(spec))
    # Assert: four parameters moved, within the task's clip
    delta = decrypted(owner_keys, update.ciphertext, spec.n_params)
    assert spec.n_params == 4 and update.samples == 100
    assert 0 < np.linalg.norm(delta) <= spec.dp.update_clip + 1e-3


def test_an_mlp_update_carries_every_parameter(
    owner_keys: OwnerKeys, public_context: ts.Context
) -> None:
    # Prepare
    spec = spec_with(owner_keys, ("temperature_c", "light_lux"), model="mlp", hidden=(8, 4))
    start = initial_model(spec)
    # Execute
    update = update_for(spec, public_context, start)
    # Assert
    delta = decrypted(owner_keys, update.ciphertext, spec.n_params)
    assert spec.n_params == 2 * 8 + 8 + 8 * 4 + 4 + 4 + 1
    assert np.count_nonzero(np.abs(delta) > 1e-4) > spec.n_params // 2
    assert np.linalg.norm(delta) <= spec.dp.update_clip + 1e-3
    np.testing.assert_array_equal(model_from_bytes(model_bytes(start), spec.n_params), start)


def test_an_mlp_larger_than_one_ciphertext_is_summed_decrypted_and_released(
    owner_keys: OwnerKeys, public_context: ts.Context
) -> None:
    # Prepare: 6 inputs, 600 hidden units: 4,801 parameters, over one ciphertext's 4,096 values
    features = ("temperature_c", "humidity_pct", "light_lux", "co2_ppm", "hour_sin", "hour_cos")
    spec = spec_with(owner_keys, features, model="mlp", hidden=(600, 2))
    per_ciphertext = DEFAULT_PROFILE.values_per_ciphertext
    assert spec.n_params == 6 * 600 + 600 + 600 * 2 + 2 + 2 + 1 > per_ciphertext
    start = initial_model(spec)
    updates = [update_for(spec, public_context, start, readings) for readings in (64, 128)]
    # Execute: the aggregator's sum and the owner's release check, on the task's n_params
    total = sum_ciphertexts(public_context, [u.ciphertext for u in updates], spec.n_params)
    share = KeyShare.from_context("owner", owner_keys.context)
    partial = share.partial_decrypt(owner_keys.context, total, spec.n_params)
    slots = combine_slots(owner_keys.context, total, spec.n_params, [partial], ["owner"])
    bounds = ReleaseBounds(spec.n_params, 2, spec.dp.update_clip, noise_slack(DEFAULT_PROFILE, 1))
    # Assert: two ciphertexts, released, and their sum is the sum of the two deltas
    assert slots.shape == (2, per_ciphertext)
    assert bounds.check(slots) is None
    each = [decrypted(owner_keys, u.ciphertext, spec.n_params) for u in updates]
    np.testing.assert_allclose(slots.reshape(-1)[: spec.n_params], each[0] + each[1], atol=1e-3)
