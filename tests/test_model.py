"""Logistic regression: gradients, learning, determinism, fixed feature scaling."""

import numpy as np
import pytest

from truscl.errors import ConfigError
from truscl.learning import FeatureScaler, LogisticModel, train_centralised


def _separable(n: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs far apart: a linear classifier can reach 100 %."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n).astype(np.float64)
    X = rng.normal(scale=0.5, size=(n, 2)) + np.where(y[:, None] == 1, 1.5, -1.5)
    return X, y


def test_per_example_grads_match_finite_differences() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    model = LogisticModel(3)
    X, y = rng.normal(size=(4, 3)), np.array([0.0, 1.0, 1.0, 0.0])
    params = rng.normal(size=model.n_params)
    step = 1e-6

    # Execute
    grads = model.per_example_grads(params, X, y)

    # Assert
    assert grads.shape == (4, 4)
    for i in range(4):
        for j in range(model.n_params):
            bump = np.zeros(model.n_params)
            bump[j] = step
            numeric = (
                model.loss(params + bump, X[i : i + 1], y[i : i + 1])
                - model.loss(params - bump, X[i : i + 1], y[i : i + 1])
            ) / (2 * step)
            assert grads[i, j] == pytest.approx(numeric, abs=1e-7)


def test_logistic_regression_learns_a_separable_set() -> None:
    # Prepare
    X, y = _separable()
    model = LogisticModel(2)
    start = model.init_params()

    # Execute
    params = train_centralised(model, X, y, epochs=100, lr=0.5)

    # Assert
    assert model.accuracy(start, X, y) < 0.6
    assert model.accuracy(params, X, y) == 1.0
    assert model.loss(params, X, y) < 0.1 * model.loss(start, X, y)


def test_mini_batch_training_is_deterministic() -> None:
    # Prepare
    X, y = _separable()
    model = LogisticModel(2)

    # Execute
    first = train_centralised(model, X, y, epochs=3, lr=0.1, batch_size=16, seed=7)
    second = train_centralised(model, X, y, epochs=3, lr=0.1, batch_size=16, seed=7)
    other_seed = train_centralised(model, X, y, epochs=3, lr=0.1, batch_size=16, seed=8)

    # Assert
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other_seed)


def test_extreme_logits_stay_finite() -> None:
    # Prepare
    model = LogisticModel(1)
    X, y = np.array([[1e6], [-1e6]]), np.array([0.0, 1.0])

    # Execute (underflow to 0 is harmless; overflow or NaN would not be)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        proba = model.predict_proba(np.array([1.0, 0.0]), X)
        loss = model.loss(np.array([1.0, 0.0]), X, y)

    # Assert
    np.testing.assert_array_equal(proba, [1.0, 0.0])
    assert loss == pytest.approx(1e6)


def test_wrong_shapes_are_refused() -> None:
    model = LogisticModel(2)
    with pytest.raises(ValueError, match="params"):
        model.predict_proba(np.zeros(2), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="X must"):
        model.predict_proba(np.zeros(3), np.zeros((1, 3)))
    with pytest.raises(ConfigError):
        LogisticModel(0)


def test_scaler_maps_physical_ranges_to_unit_interval() -> None:
    # Prepare: temperature in -40..85 °C, humidity in 0..100 %
    scaler = FeatureScaler.from_ranges([(-40.0, 85.0), (0.0, 100.0)])

    # Execute
    scaled = scaler.apply(np.array([[-40.0, 100.0], [22.5, 50.0]]))

    # Assert
    np.testing.assert_allclose(scaled, [[-1.0, 1.0], [0.0, 0.0]])


def test_scaler_round_trips_through_lists() -> None:
    scaler = FeatureScaler(offset=(1.0, -2.5), scale=(3.0, 0.5))
    assert FeatureScaler.from_list(scaler.to_list()) == scaler
    assert scaler.to_list() == [[1.0, 3.0], [-2.5, 0.5]]


@pytest.mark.parametrize(
    ("offset", "scale"),
    [((0.0,), (0.0,)), ((0.0,), (float("nan"),)), ((0.0, 1.0), (1.0,)), ((), ())],
)
def test_scaler_refuses_unusable_values(
    offset: tuple[float, ...], scale: tuple[float, ...]
) -> None:
    with pytest.raises(ConfigError):
        FeatureScaler(offset=offset, scale=scale)


def test_scaler_refuses_wrong_feature_count() -> None:
    scaler = FeatureScaler(offset=(0.0,), scale=(1.0,))
    with pytest.raises(ValueError, match="expected 1 features"):
        scaler.apply(np.zeros((2, 2)))
    with pytest.raises(ConfigError):
        FeatureScaler.from_ranges([(1.0, 1.0)])
