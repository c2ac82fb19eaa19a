"""The model registry and its MLP: the flat layout, per-example gradients, learning."""

from __future__ import annotations

import numpy as np
import pytest

from truscl.errors import ConfigError
from truscl.learning import LogisticModel, MlpModel, make_model, train_centralised
from truscl.privacy.dp import DpSgdConfig, dp_sgd


def _xor(n: int = 400, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Label 1 where the two inputs have the same sign: no line separates it."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2))
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.float64)


@pytest.mark.parametrize("hidden", [(8,), (8, 4), (3, 5)])
def test_per_example_grads_match_finite_differences(hidden: tuple[int, ...]) -> None:
    # Prepare
    rng = np.random.default_rng(1)
    model = MlpModel(3, hidden)
    X, y = rng.normal(size=(5, 3)), np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    params = model.init_params(seed=2) + rng.normal(scale=0.1, size=model.n_params)
    step = 1e-6

    # Execute
    grads = model.per_example_grads(params, X, y)

    # Assert: each example's gradient, each parameter, against a central difference
    assert grads.shape == (5, model.n_params)
    for i in range(5):
        for j in range(model.n_params):
            bump = np.zeros(model.n_params)
            bump[j] = step
            numeric = (
                model.loss(params + bump, X[i : i + 1], y[i : i + 1])
                - model.loss(params - bump, X[i : i + 1], y[i : i + 1])
            ) / (2 * step)
            assert grads[i, j] == pytest.approx(numeric, abs=1e-7)


def test_the_flat_layout_is_each_layers_weights_in_c_order_then_its_bias() -> None:
    # Prepare: parameters 0, 1, 2, ... so each position says where it sits
    model = MlpModel(3, (4, 2))
    params = np.arange(model.n_params, dtype=np.float64) / 100
    X = np.array([[0.5, -1.0, 2.0]])

    # Execute: the forward pass written out from the documented layout
    W1, b1 = params[0:12].reshape(3, 4), params[12:16]
    W2, b2 = params[16:24].reshape(4, 2), params[24:26]
    W3, b3 = params[26:28].reshape(2, 1), params[28:29]
    logit = np.tanh(np.tanh(X @ W1 + b1) @ W2 + b2) @ W3 + b3

    # Assert
    assert model.n_params == 29 and model.shapes == [(3, 4), (4, 2), (2, 1)]
    np.testing.assert_allclose(model.predict_proba(params, X), 1 / (1 + np.exp(-logit[:, 0])))
    assert [w.shape for w, _ in model.layers(params)] == [(3, 4), (4, 2), (2, 1)]


def test_an_mlp_learns_what_logistic_regression_cannot() -> None:
    # Prepare
    X, y = _xor()
    mlp, logistic = MlpModel(2, (8,)), LogisticModel(2)

    # Execute
    trained = train_centralised(mlp, X, y, epochs=2000, lr=1.0, params=mlp.init_params(seed=3))
    linear = train_centralised(logistic, X, y, epochs=2000, lr=1.0)

    # Assert
    assert mlp.accuracy(trained, X, y) > 0.9
    assert logistic.accuracy(linear, X, y) < 0.7


def test_dp_sgd_trains_an_mlp_with_per_example_clipping() -> None:
    # Prepare: no noise, so the run is deterministic given the generator's sampling
    X, y = _xor()
    model = MlpModel(2, (8, 4))
    start = model.init_params(seed=5)
    config = DpSgdConfig(
        clip_norm=1.0, noise_multiplier=0.0, sampling_rate=0.25, steps=400, learning_rate=1.0
    )

    # Execute
    trained = dp_sgd(model, start, X, y, config, np.random.default_rng(0))

    # Assert
    assert model.loss(trained, X, y) < 0.7 * model.loss(start, X, y)


def test_initial_parameters_are_drawn_from_the_seed_and_break_symmetry() -> None:
    model = MlpModel(4, (8, 4))

    first, again, other = (model.init_params(seed=s) for s in (7, 7, 8))

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    W1 = model.layers(first)[0][0]
    assert len({tuple(column) for column in W1.T}) == 8  # no two hidden units alike
    assert np.all(np.abs(W1) <= np.sqrt(6 / (4 + 8)))  # Glorot-uniform's limit
    assert np.all(model.layers(first)[0][1] == 0)


def test_the_registry_makes_each_kind_with_its_parameter_count() -> None:
    assert make_model("logistic", 3).n_params == 4
    assert make_model("mlp", 6, [8, 4]).n_params == 6 * 8 + 8 + 8 * 4 + 4 + 4 + 1
    assert make_model("mlp", 4, [8]).n_params == 4 * 8 + 8 + 8 + 1
    assert np.all(make_model("logistic", 3).init_params(seed=9) == 0)


@pytest.mark.parametrize(
    ("kind", "hidden", "message"),
    [
        ("forest", (), "unknown model 'forest'"),
        ("logistic", (8,), "hidden must be empty for a logistic model"),
        ("mlp", (), "hidden must list 1 to 2 layer sizes"),
        ("mlp", (8, 4, 2), "hidden must list 1 to 2 layer sizes"),
        ("mlp", (8, 0), "layer sizes must be integers >= 1"),
    ],
)
def test_a_model_the_registry_cannot_make_is_refused(
    kind: str, hidden: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_model(kind, 3, hidden)


def test_wrong_shapes_are_refused() -> None:
    model = MlpModel(2, (3,))
    with pytest.raises(ValueError, match="params"):
        model.predict_proba(np.zeros(5), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="X must"):
        model.predict_proba(np.zeros(model.n_params), np.zeros((1, 3)))
