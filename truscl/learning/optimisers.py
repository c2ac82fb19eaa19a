"""Server-side optimisers: how the owner turns a round's released mean delta into the next model.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021): the mean of the devices' model
deltas is a pseudo-gradient (its negative), and the server may step along it with any first-
order optimiser. FedAvg adds it as it is (server learning rate 1: plain federated averaging);
FedAvgM keeps a server momentum, which smooths the round-to-round swings that devices with
unlike data cause; FedAdam scales each parameter by a running estimate of its deltas' size.

Each works on the aggregate that the owner has already decrypted, bounded and rounded, so none
changes what a device's privacy costs: it is post-processing of the released average. Each is
a pure function of ``(model, mean delta, state)`` to ``(next model, next state)``; the state
is what the owner must keep on disk for a restart to release what it would have released.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from truscl.errors import ConfigError, ProtocolError

OPTIMISERS = ("fedavg", "fedavgm", "fedadam")


@dataclass(frozen=True)
class OptimiserTerms:
    """The server optimiser a task names (its ``[optimiser]`` table); the defaults are plain
    federated averaging. ``momentum`` is FedAvgM's, ``beta1``, ``beta2`` and ``tau`` FedAdam's
    (``tau``, the adaptivity: the smaller, the nearer every parameter's step comes to
    ``learning_rate`` whatever the size of its deltas); each ignores the others'. ``tau``'s
    default suits deltas of the size the occupancy tasks' devices send (bench/learning.py)."""

    name: str = "fedavg"
    learning_rate: float = 1.0  # the server's, not the devices'
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "name": self.name in OPTIMISERS,
            "learning_rate": self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "momentum": 0 <= self.momentum < 1,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "tau": self.tau > 0 and math.isfinite(self.tau),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"invalid optimiser terms: {', '.join(bad)} (name is one of {list(OPTIMISERS)}, "
                "learning_rate and tau > 0, momentum and betas in [0, 1))"
            )


_STATE_HEADER = struct.Struct("<QII")  # steps, number of moments, parameters per moment


@dataclass(frozen=True, eq=False)
class OptimiserState:
    """What a server optimiser remembers between rounds: the number of steps taken and its
    moments (FedAvgM: the momentum; FedAdam: the first and second moments), empty until the
    first step and for FedAvg."""

    steps: int = 0
    moments: tuple[np.ndarray, ...] = ()

    def to_bytes(self) -> bytes:
        """Little-endian, exact: a restarted owner goes on from the very same floats."""
        size = self.moments[0].size if self.moments else 0
        header = _STATE_HEADER.pack(self.steps, len(self.moments), size)
        return header + b"".join(np.asarray(m, dtype="<f8").tobytes() for m in self.moments)

    @classmethod
    def from_bytes(cls, data: bytes) -> OptimiserState:
        head = _STATE_HEADER.size
        if len(data) < head:
            raise ProtocolError("optimiser state is truncated")
        steps, count, size = _STATE_HEADER.unpack_from(data)
        if len(data) != head + 8 * count * size:
            raise ProtocolError(f"optimiser state has {len(data)} bytes for {count} x {size}")
        flat = np.frombuffer(data, dtype="<f8", offset=head).astype(np.float64)
        if not np.all(np.isfinite(flat)):
            raise ProtocolError("optimiser state holds non-finite values")
        return cls(steps, tuple(flat.reshape(count, size)) if count else ())


def server_step(
    terms: OptimiserTerms, params: np.ndarray, mean_delta: np.ndarray, state: OptimiserState
) -> tuple[np.ndarray, OptimiserState]:
    """The next global model and optimiser state from the previous model and a round's mean
    delta (Reddi et al. 2021, Algorithm 2, with the delta as the negative pseudo-gradient).

    - FedAvg: ``x + lr * delta``; with ``lr = 1``, exactly ``x + delta``.
    - FedAvgM: ``v = momentum * v + delta``, ``x + lr * v``.
    - FedAdam: ``m = beta1 m + (1 - beta1) delta``, ``v = beta2 v + (1 - beta2) delta^2``,
      ``x + lr * m / (sqrt(v) + tau)``, from ``m = 0`` and ``v = tau^2`` as in the paper, and
      without bias correction (nor does the paper).
    """
    params = np.asarray(params, dtype=np.float64)
    delta = np.asarray(mean_delta, dtype=np.float64)
    if delta.shape != params.shape:
        raise ValueError(f"delta has shape {delta.shape}, the model {params.shape}")
    if state.moments and state.moments[0].shape != params.shape:
        raise ValueError("optimiser state is for a model of another size")
    lr, steps = terms.learning_rate, state.steps + 1
    if terms.name == "fedavg":
        return params + lr * delta, OptimiserState(steps)  # lr 1: exactly x + delta
    if terms.name == "fedavgm":
        (velocity,) = state.moments or (np.zeros_like(params),)
        velocity = terms.momentum * velocity + delta
        return params + lr * velocity, OptimiserState(steps, (velocity,))
    first, second = state.moments or (np.zeros_like(params), np.full_like(params, terms.tau**2))
    first = terms.beta1 * first + (1 - terms.beta1) * delta
    second = terms.beta2 * second + (1 - terms.beta2) * delta**2
    step = lr * first / (np.sqrt(second) + terms.tau)
    return params + step, OptimiserState(steps, (first, second))
