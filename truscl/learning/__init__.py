"""Models and training: what a device runs on its own data, the non-private baseline, and the
owner's server optimisers."""

from truscl.learning.features import FEATURES, LABELS, feature_matrix, labels, missing_sensor
from truscl.learning.mlp import MlpModel
from truscl.learning.model import FeatureScaler, LogisticModel, Model, train_centralised
from truscl.learning.optimisers import OptimiserState, OptimiserTerms, server_step
from truscl.learning.registry import MODELS, make_model

__all__ = [
    "FEATURES",
    "LABELS",
    "MODELS",
    "FeatureScaler",
    "LogisticModel",
    "MlpModel",
    "Model",
    "OptimiserState",
    "OptimiserTerms",
    "feature_matrix",
    "labels",
    "make_model",
    "missing_sensor",
    "server_step",
    "train_centralised",
]
