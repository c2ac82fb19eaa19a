"""Device agent: what runs on each Raspberry Pi."""

from truscl.agent.sensors import FEATURES, Reading, SensorSuite

__all__ = ["FEATURES", "Reading", "SensorSuite"]
