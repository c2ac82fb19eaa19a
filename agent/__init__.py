"""Device agent: what runs on each Raspberry Pi."""

from truscl.agent.sensors import Reading, SensorSuite

__all__ = ["Reading", "SensorSuite"]
