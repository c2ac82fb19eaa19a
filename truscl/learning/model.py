"""Logistic regression over one flat parameter vector, in plain numpy, and what every model of
the registry (:mod:`truscl.learning.registry`) offers.

The parameters are a single float64 vector (weights, then bias) because that is what travels:
a device clips, noises and encrypts a flat delta, and the owner adds one back. Keeping the model
a set of pure functions of ``(params, X, y)`` lets DP-SGD, the centralised baseline and the tests
share them without any hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from truscl.errors import ConfigError


class Model(Protocol):
    """A binary classifier over one flat float64 parameter vector, as pure functions.

    What DP-SGD, the owner's initial model, the demo's evaluation and the baseline need.
    """

    @property
    def n_params(self) -> int: ...

    def init_params(self, seed: int = 0) -> np.ndarray: ...

    def predict_proba(self, params: np.ndarray, X: np.ndarray) -> np.ndarray: ...

    def accuracy(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float: ...

    def loss(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float: ...

    def per_example_grads(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray: ...


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function written with tanh, which never overflows for large ``|z|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose thresholded prediction (0.5) equals the 0/1 label."""
    return float(np.mean((proba >= 0.5) == (np.asarray(y) >= 0.5)))


def bce_on_logits(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of logits ``z``, as ``log(1 + e^z) - y z`` so it stays finite."""
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(y, dtype=np.float64) * z))


@dataclass(frozen=True)
class LogisticModel:
    """Binary logistic regression on ``n_features`` already-scaled features."""

    n_features: int

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise ConfigError(f"n_features must be >= 1, got {self.n_features}")

    @property
    def n_params(self) -> int:
        """Weights plus one bias."""
        return self.n_features + 1

    def init_params(self, seed: int = 0) -> np.ndarray:
        """Zeros whatever ``seed``: a convex loss needs no random start."""
        return np.zeros(self.n_params, dtype=np.float64)

    def _logits(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        self._check(params, X)
        return X @ params[:-1] + params[-1]

    def predict_proba(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Probability of class 1 for each row of ``X``."""
        return sigmoid(self._logits(params, X))

    def accuracy(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Share of rows whose thresholded prediction (0.5) equals the 0/1 label."""
        return accuracy(self.predict_proba(params, X), y)

    def loss(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Mean binary cross-entropy."""
        return bce_on_logits(self._logits(params, X), y)

    def per_example_grads(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gradient of each example's loss, one row per example, shape ``(n, n_params)``.

        DP-SGD clips every example separately, so the batch gradient alone is not enough.
        For logistic regression the row is ``(p - y) * [x, 1]``, computed for all rows at once.
        """
        residual = self.predict_proba(params, X) - np.asarray(y, dtype=np.float64)
        grads = np.empty((X.shape[0], self.n_params), dtype=np.float64)
        grads[:, :-1] = residual[:, None] * X
        grads[:, -1] = residual
        return grads

    def _check(self, params: np.ndarray, X: np.ndarray) -> None:
        if params.shape != (self.n_params,):
            raise ValueError(f"params must have shape ({self.n_params},), got {params.shape}")
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")


def train_centralised(
    model: Model,
    X: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    params: np.ndarray | None = None,
) -> np.ndarray:
    """Plain gradient descent on pooled data: the non-private baseline that DP runs are judged by.

    Full-batch when ``batch_size`` is None; otherwise mini-batches over a permutation drawn from
    ``seed`` each epoch, so the same call always returns the same parameters. The permutation
    is not privacy noise, so a seeded generator is right here.
    """
    if epochs < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    current = model.init_params() if params is None else params.astype(np.float64, copy=True)
    n = X.shape[0]
    step = n if batch_size is None else batch_size
    order_rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = np.arange(n) if batch_size is None else order_rng.permutation(n)
        for start in range(0, n, step):
            rows = order[start : start + step]
            grad = model.per_example_grads(current, X[rows], y[rows]).mean(axis=0)
            current = current - lr * grad
    return current


@dataclass(frozen=True)
class FeatureScaler:
    """Fixed per-feature affine scaling, ``(x - offset) / scale``, carried in the task spec.

    The owner knows each sensor's physical range, so scaling is fixed up front instead of being
    estimated from data: estimating it would need pooled statistics, which is a privacy leak.
    """

    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.offset) != len(self.scale) or not self.offset:
            raise ConfigError("offset and scale must be non-empty and of equal length")
        values = (*self.offset, *self.scale)
        if not all(math.isfinite(v) for v in values) or any(s == 0 for s in self.scale):
            raise ConfigError("offsets and scales must be finite and scales non-zero")

    @classmethod
    def from_ranges(cls, ranges: Sequence[tuple[float, float]]) -> FeatureScaler:
        """Map each sensor's physical range ``(low, high)`` onto ``[-1, 1]``."""
        if any(high <= low for low, high in ranges):
            raise ConfigError(f"every range needs low < high, got {list(ranges)}")
        return cls(
            offset=tuple((low + high) / 2 for low, high in ranges),
            scale=tuple((high - low) / 2 for low, high in ranges),
        )

    @property
    def n_features(self) -> int:
        return len(self.offset)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Scaled copy of ``X`` (rows are readings, columns the features in spec order)."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape[-1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {X.shape[-1]}")
        return (X - np.asarray(self.offset)) / np.asarray(self.scale)

    def to_list(self) -> list[list[float]]:
        """``[[offset, scale], ...]`` per feature: plain lists for a JSON or CBOR task spec."""
        return [[o, s] for o, s in zip(self.offset, self.scale, strict=True)]

    @classmethod
    def from_list(cls, pairs: Sequence[Sequence[float]]) -> FeatureScaler:
        """Inverse of :meth:`to_list`; validates like the constructor."""
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError("each feature needs exactly [offset, scale]")
        return cls(
            offset=tuple(float(o) for o, _ in pairs), scale=tuple(float(s) for _, s in pairs)
        )
