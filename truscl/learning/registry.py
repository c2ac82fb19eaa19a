"""The models a task may name, by kind: ``logistic`` and ``mlp``.

The task's ``model`` and ``hidden`` pick one; its parameter count, and with it everything that
carries the parameters (the CKKS ciphertexts, the chunking, the release bounds, the model's
bytes), follows from :func:`make_model`.
"""

from __future__ import annotations

from collections.abc import Sequence

from truscl.errors import ConfigError
from truscl.learning.mlp import MlpModel
from truscl.learning.model import LogisticModel, Model

MODELS = ("logistic", "mlp")


def make_model(kind: str, n_features: int, hidden: Sequence[int] = ()) -> Model:
    """The model of ``kind`` on ``n_features`` inputs; ``hidden`` sizes an mlp's layers."""
    if kind == "logistic":
        if hidden:
            raise ConfigError(f"hidden must be empty for a logistic model, got {list(hidden)}")
        return LogisticModel(n_features)
    if kind == "mlp":
        return MlpModel(n_features, tuple(hidden))
    raise ConfigError(f"unknown model {kind!r} (known: {', '.join(MODELS)})")
