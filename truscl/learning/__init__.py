"""Models and training: what a device runs on its own data, and the non-private baseline."""

from truscl.learning.model import FeatureScaler, LogisticModel, train_centralised

__all__ = ["FeatureScaler", "LogisticModel", "train_centralised"]
