"""Models and training: what a device runs on its own data, the non-private baseline, and the
owner's server optimisers."""

from truscl.learning.model import FeatureScaler, LogisticModel, train_centralised
from truscl.learning.optimisers import OptimiserState, OptimiserTerms, server_step

__all__ = [
    "FeatureScaler",
    "LogisticModel",
    "OptimiserState",
    "OptimiserTerms",
    "server_step",
    "train_centralised",
]
