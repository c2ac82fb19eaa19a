"""DP-SGD: clipping, noise scale, Poisson sampling with the expected batch size, secure seeds."""

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from truscl.errors import ConfigError
from truscl.learning import LogisticModel, train_centralised
from truscl.privacy import DpSgdConfig, clip_by_l2, clip_rows, dp_sgd, secure_generator

BASE = DpSgdConfig(
    clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.1, steps=10, learning_rate=0.1
)


def _blobs(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n).astype(np.float64)
    return rng.normal(scale=0.5, size=(n, 2)) + np.where(y[:, None] == 1, 1.0, -1.0), y


def test_clip_by_l2_caps_the_norm_and_keeps_the_direction() -> None:
    # Prepare
    v = np.array([3.0, 4.0])

    # Execute
    clipped, untouched = clip_by_l2(v, 1.0), clip_by_l2(v, 10.0)

    # Assert
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    np.testing.assert_array_equal(untouched, v)
    np.testing.assert_array_equal(v, [3.0, 4.0])


def test_clip_rows_clips_each_row_and_survives_zero_rows() -> None:
    # Prepare
    G = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])

    # Execute
    with np.errstate(all="raise"):
        clipped = clip_rows(G, 1.0)
        huge_bound = clip_rows(G, 1e308)

    # Assert
    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]])
    np.testing.assert_array_equal(huge_bound, G)
    assert clip_by_l2(np.zeros(3), 1.0).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
def test_clipping_refuses_non_positive_bounds(bound: float) -> None:
    with pytest.raises(ValueError, match="bound"):
        clip_by_l2(np.ones(2), bound)
    with pytest.raises(ConfigError):
        clip_rows(np.ones((1, 2)), bound)


@pytest.mark.parametrize(
    "change",
    [
        {"clip_norm": 0.0},
        {"noise_multiplier": -0.1},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"steps": 0},
        {"learning_rate": 0.0},
    ],
)
def test_config_validation(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(BASE, **change)


def test_secure_generator_is_seeded_afresh_each_call() -> None:
    # Execute
    first, second = secure_generator(), secure_generator()

    # Assert
    assert isinstance(first.bit_generator, np.random.PCG64)
    assert not np.array_equal(first.random(4), second.random(4))


def test_two_rounds_generators_have_independent_os_seeds() -> None:
    # Prepare: what two rounds of a device get, one generator each, seeded from os.urandom
    first, second = secure_generator(), secure_generator()
    seeds = [g.bit_generator.seed_seq.entropy for g in (first, second)]  # type: ignore[attr-defined]

    # Execute
    a, b = first.normal(size=8192), second.normal(size=8192)

    # Assert: distinct 256-bit seeds (two equal ones from the OS: probability 2^-256), and
    # streams with no correlation beyond chance (5 standard deviations is 0.055 at n = 8192)
    assert seeds[0] != seeds[1]
    assert all(isinstance(s, int) and 0 <= s < 2**256 for s in seeds)
    assert max(seeds).bit_length() > 128  # 256 random bits: below 2^128 with probability 2^-128
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 5 / np.sqrt(8192)


def test_without_noise_or_sampling_dp_sgd_is_plain_gradient_descent() -> None:
    # Prepare: q = 1 keeps every example, a huge clip never bites, sigma = 0 adds nothing
    X, y = _blobs(50)
    model = LogisticModel(2)
    config = DpSgdConfig(
        clip_norm=1e9, noise_multiplier=0.0, sampling_rate=1.0, steps=20, learning_rate=0.3
    )

    # Execute
    private = dp_sgd(model, model.init_params(), X, y, config, np.random.default_rng(0))
    plain = train_centralised(model, X, y, epochs=20, lr=0.3)

    # Assert
    np.testing.assert_allclose(private, plain, rtol=1e-12)


def test_clipping_bounds_one_examples_contribution() -> None:
    # Prepare: one example whose gradient norm is ~1000, far above C
    model = LogisticModel(2)
    X, y = np.array([[1000.0, -200.0]]), np.array([1.0])
    config = DpSgdConfig(
        clip_norm=0.5, noise_multiplier=0.0, sampling_rate=1.0, steps=1, learning_rate=0.2
    )
    params = model.init_params()

    # Execute
    updated = dp_sgd(model, params, X, y, config, np.random.default_rng(0))

    # Assert: the step is exactly lr * C / (q n), and params was not mutated
    assert np.linalg.norm(updated - params) == pytest.approx(0.2 * 0.5)
    np.testing.assert_array_equal(params, model.init_params())


def test_update_is_divided_by_the_expected_batch_size() -> None:
    # Prepare: one example, q = 0.5, so the batch holds 0 or 1 examples
    model = LogisticModel(2)
    X, y = np.array([[0.1, 0.2]]), np.array([1.0])
    config = DpSgdConfig(
        clip_norm=10.0, noise_multiplier=0.0, sampling_rate=0.5, steps=1, learning_rate=0.1
    )
    params = model.init_params()
    gradient = model.per_example_grads(params, X, y)[0]
    rng = np.random.default_rng(1)

    # Execute
    steps = [dp_sgd(model, params, X, y, config, rng) - params for _ in range(40)]

    # Assert: a sampled example counts 1 / q = 2 times, never 1 (the actual batch size)
    sampled = [step for step in steps if np.any(step)]
    assert 0 < len(sampled) < len(steps)
    for step in sampled:
        np.testing.assert_allclose(step, -0.1 * gradient / 0.5)


def test_noise_std_is_sigma_c_over_expected_batch() -> None:
    # Prepare
    X, y = _blobs(4)
    model = LogisticModel(2)
    noisy = DpSgdConfig(
        clip_norm=0.5, noise_multiplier=2.0, sampling_rate=1.0, steps=1, learning_rate=0.1
    )
    params = model.init_params()
    rng = np.random.default_rng(2)
    deterministic = dp_sgd(model, params, X, y, replace(noisy, noise_multiplier=0.0), rng)

    # Execute
    noise = np.array([dp_sgd(model, params, X, y, noisy, rng) for _ in range(3000)])
    noise -= deterministic

    # Assert: 9000 draws give the std to within ~1 %; allow 4 %
    expected = 2.0 * 0.5 / (1.0 * 4) * 0.1
    assert np.std(noise) == pytest.approx(expected, rel=0.04)
    assert abs(np.mean(noise)) < 4 * expected / np.sqrt(noise.size)


def test_dp_sgd_still_learns_a_separable_set() -> None:
    # Prepare
    X, y = _blobs(1000)
    model = LogisticModel(2)
    config = DpSgdConfig(
        clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.05, steps=200, learning_rate=0.5
    )

    # Execute
    params = dp_sgd(model, model.init_params(), X, y, config, np.random.default_rng(4))

    # Assert
    assert model.accuracy(params, X, y) > 0.95
