"""Simulated rooms and hardware behind the same interfaces as a real device's sensors."""

from truscl.sim.fleet import MONDAY_2024_01_08, make_fleet
from truscl.sim.hardware import (
    FakeBme280Bus,
    MockMcp3008,
    SimulatedBoard,
    SimulatedDevice,
)
from truscl.sim.rooms import Room, RoomProfile, RoomState, make_rooms

__all__ = [
    "MONDAY_2024_01_08",
    "FakeBme280Bus",
    "MockMcp3008",
    "Room",
    "RoomProfile",
    "RoomState",
    "SimulatedBoard",
    "SimulatedDevice",
    "make_fleet",
    "make_rooms",
]
