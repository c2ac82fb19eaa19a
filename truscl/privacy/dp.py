"""Record-level DP-SGD: per-example clipping, Gaussian noise, Poisson sampling.

Every random draw that protects privacy (sampling and noise) comes from a generator passed in
explicitly, normally :func:`secure_generator`. Nothing here touches numpy's global state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from truscl.errors import ConfigError

SEED_BYTES = 32  # 256 bits: more than PCG64's 128-bit state, so no seed is ever reused


class GradientModel(Protocol):
    """What DP-SGD needs from a model: per-example gradients over a flat parameter vector."""

    @property
    def n_params(self) -> int: ...

    def per_example_grads(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray: ...


def secure_generator() -> np.random.Generator:
    """A PCG64 generator seeded with 256 bits from the operating system's CSPRNG (os.urandom).

    ``np.random.normal`` draws from a global Mersenne Twister whose state can be recovered from
    its outputs and is often seeded predictably; an attacker who can predict the noise can
    subtract it. PCG64 is not a CSPRNG either: whoever learns one generator's state (a memory
    dump, a leak through many outputs) can replay all its later draws, so a device makes a
    fresh one per round rather than one per process, and one round's noise says nothing of the
    next's. Tests pass a seeded generator to the same functions instead. The seed is readable
    as ``generator.bit_generator.seed_seq.entropy``.
    """
    seed = int.from_bytes(os.urandom(SEED_BYTES), "big")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


def _check_bound(bound: float) -> None:
    if not bound > 0:
        raise ConfigError(f"clipping bound must be > 0, got {bound}")


def clip_by_l2(v: np.ndarray, bound: float) -> np.ndarray:
    """``v`` scaled down to L2 norm at most ``bound`` (a copy; a zero vector stays zero)."""
    _check_bound(bound)
    norm = float(np.linalg.norm(v))
    return np.asarray(v, dtype=np.float64) * (bound / max(norm, bound))


def clip_rows(G: np.ndarray, bound: float) -> np.ndarray:
    """Each row of ``G`` clipped to L2 norm at most ``bound``, without dividing by zero."""
    _check_bound(bound)
    norms = np.linalg.norm(G, axis=1, keepdims=True)
    # Rows already within the bound divide by the bound itself (factor 1), so a zero row
    # never reaches a division.
    return np.asarray(G, dtype=np.float64) * (bound / np.maximum(norms, bound))


@dataclass(frozen=True)
class DpSgdConfig:
    """DP-SGD hyper-parameters; the first three also fix the privacy cost (see accounting)."""

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    learning_rate: float

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


def dp_sgd(
    model: GradientModel,
    params: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    config: DpSgdConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Run ``config.steps`` DP-SGD steps and return new parameters (``params`` is untouched).

    Each step keeps every example independently with probability ``q`` (Poisson sampling, which
    is what the RDP accountant assumes), clips each kept example's gradient to ``C``, adds
    ``N(0, (sigma C)^2)`` to the sum and divides by the *expected* batch size ``q n``. Dividing
    by the actual batch size would make the scale depend on who was sampled, so one record
    could change the update by more than ``C / (q n)``; the fixed divisor keeps the sensitivity
    fixed and the estimate unbiased.
    """
    n = X.shape[0]
    if n == 0:
        raise ValueError("DP-SGD needs at least one example")
    expected_batch = config.sampling_rate * n
    noise_std = config.noise_multiplier * config.clip_norm
    current = np.array(params, dtype=np.float64)
    for _ in range(config.steps):
        sampled = rng.random(n) < config.sampling_rate
        grads = clip_rows(
            model.per_example_grads(current, X[sampled], y[sampled]), config.clip_norm
        )
        noisy_sum = grads.sum(axis=0) + rng.normal(0.0, noise_std, size=model.n_params)
        current = current - config.learning_rate * noisy_sum / expected_batch
    return current
