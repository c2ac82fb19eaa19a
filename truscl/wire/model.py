"""Global model parameters on the wire: little-endian float64, hashed with keccak-256.

The hash of these bytes is what the owner anchors on chain for each released model, so the
encoding must be exact and platform-independent.
"""

from __future__ import annotations

import numpy as np

from truscl.errors import ProtocolError
from truscl.hashing import keccak


def model_bytes(params: np.ndarray) -> bytes:
    return np.asarray(params, dtype="<f8").tobytes()


def model_hash(params: np.ndarray) -> bytes:
    return keccak(model_bytes(params))


def model_from_bytes(data: bytes, n_params: int) -> np.ndarray:
    if len(data) != 8 * n_params:
        raise ProtocolError(f"model has {len(data)} bytes, expected {8 * n_params}")
    params = np.frombuffer(data, dtype="<f8").copy()
    if not np.all(np.isfinite(params)):
        raise ProtocolError("model holds non-finite parameters")
    return params
