"""A small multilayer perceptron over one flat parameter vector, in plain numpy.

The flat layout is a contract with the LiteRT model a device may train with instead: for each
layer in order, its weights ``W`` of shape ``(n_in, n_out)`` flattened in C order, then its bias
``b`` (``n_out``). Hidden layers use tanh (its gradient needs only builtin LiteRT ops); the last
layer has one output, the logit; the loss is binary cross-entropy on the logit. Per-example
gradients are computed for a whole batch at once by backpropagation with an example axis kept,
because DP-SGD clips every example's gradient on its own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from truscl.errors import ConfigError
from truscl.learning.model import accuracy, bce_on_logits, sigmoid

MAX_HIDDEN_LAYERS = 2


@dataclass(frozen=True)
class MlpModel:
    """Binary classifier: ``n_features`` scaled inputs, tanh hidden layers, one logit."""

    n_features: int
    hidden: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise ConfigError(f"n_features must be >= 1, got {self.n_features}")
        if not 1 <= len(self.hidden) <= MAX_HIDDEN_LAYERS:
            raise ConfigError(
                f"hidden must list 1 to {MAX_HIDDEN_LAYERS} layer sizes for an mlp, "
                f"got {list(self.hidden)}"
            )
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.hidden):
            raise ConfigError(f"hidden layer sizes must be integers >= 1, got {list(self.hidden)}")

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """``(n_in, n_out)`` of each layer, the output layer last."""
        sizes = [self.n_features, *self.hidden, 1]
        return list(itertools.pairwise(sizes))

    @property
    def n_params(self) -> int:
        return sum(n_in * n_out + n_out for n_in, n_out in self.shapes)

    def init_params(self, seed: int = 0) -> np.ndarray:
        """Glorot-uniform weights and zero biases, drawn from ``seed``.

        Not zeros: every hidden unit would then get the same gradient and stay a copy of the
        others. The owner publishes model 0, so no device ever needs to draw these itself.
        """
        rng = np.random.default_rng(seed)
        parts = []
        for n_in, n_out in self.shapes:
            limit = math.sqrt(6.0 / (n_in + n_out))
            parts += [rng.uniform(-limit, limit, size=n_in * n_out), np.zeros(n_out)]
        return np.concatenate(parts)

    def layers(self, params: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(W, b)`` of each layer, views into ``params`` in the flat layout."""
        if params.shape != (self.n_params,):
            raise ValueError(f"params must have shape ({self.n_params},), got {params.shape}")
        layers, start = [], 0
        for n_in, n_out in self.shapes:
            weights = params[start : start + n_in * n_out].reshape(n_in, n_out)
            start += n_in * n_out
            layers.append((weights, params[start : start + n_out]))
            start += n_out
        return layers

    def _forward(self, params: np.ndarray, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Each layer's input (``X`` first) and the logits."""
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
        layers = self.layers(params)
        inputs = [np.asarray(X, dtype=np.float64)]
        for weights, bias in layers[:-1]:
            inputs.append(np.tanh(inputs[-1] @ weights + bias))
        weights, bias = layers[-1]
        return inputs, (inputs[-1] @ weights + bias)[:, 0]

    def predict_proba(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        return sigmoid(self._forward(params, X)[1])

    def accuracy(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        return accuracy(self.predict_proba(params, X), y)

    def loss(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        return bce_on_logits(self._forward(params, X)[1], y)

    def per_example_grads(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gradient of each example's loss, shape ``(n, n_params)``, in the flat layout.

        The loss's derivative by the logit is ``sigmoid(z) - y``; going back through a layer,
        the gradient of ``W`` is the outer product of the layer's input and the error at its
        output, example by example, and tanh's derivative is ``1 - tanh^2``.
        """
        inputs, logits = self._forward(params, X)
        layers = self.layers(params)
        error = (sigmoid(logits) - np.asarray(y, dtype=np.float64))[:, None]  # (n, 1)
        n = X.shape[0]
        grads: list[np.ndarray] = []
        for index in range(len(layers) - 1, -1, -1):
            weights, _ = layers[index]
            layer_input = inputs[index]
            grads.append(error)  # the bias, written before its weights as we go backwards
            grads.append(np.einsum("ni,no->nio", layer_input, error).reshape(n, weights.size))
            if index:
                error = (error @ weights.T) * (1.0 - layer_input**2)
        return np.concatenate(grads[::-1], axis=1)
