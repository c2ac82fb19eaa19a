"""Models and training: what a device runs on its own data, and the non-private baseline."""

from truscl.learning.features import FEATURES, LABELS, feature_matrix, labels, missing_sensor
from truscl.learning.mlp import MlpModel
from truscl.learning.model import FeatureScaler, LogisticModel, Model, train_centralised
from truscl.learning.registry import MODELS, make_model

__all__ = [
    "FEATURES",
    "LABELS",
    "MODELS",
    "FeatureScaler",
    "LogisticModel",
    "MlpModel",
    "Model",
    "feature_matrix",
    "labels",
    "make_model",
    "missing_sensor",
    "train_centralised",
]
