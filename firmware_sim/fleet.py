"""A fleet of simulated devices, one per room, for tests and the demo."""

from __future__ import annotations

import numpy as np

from truscl.sim.hardware import SimulatedDevice
from truscl.sim.rooms import Room, make_rooms

MONDAY_2024_01_08 = 1_704_672_000.0
"""Default start: a Monday at midnight UTC, so a short run covers working days first."""


def make_fleet(n: int, seed: int, start: float = MONDAY_2024_01_08) -> list[SimulatedDevice]:
    """``n`` devices in ``n`` different rooms; the same seed gives the same fleet and data."""
    profiles = make_rooms(n, seed)
    room_seeds, noise_seeds = np.random.SeedSequence(seed).generate_state(2 * n).reshape(2, n)
    return [
        SimulatedDevice(Room(profile, int(room_seed), start), int(noise_seed))
        for profile, room_seed, noise_seed in zip(profiles, room_seeds, noise_seeds, strict=True)
    ]
