"""Simulated rooms: deterministic, varied across rooms (non-IID), learnable but not trivially."""

from __future__ import annotations

import numpy as np
import pytest

from truscl.agent.sensors import SensorSuite
from truscl.learning.features import DEFAULT_FEATURES, feature_matrix
from truscl.sim import MONDAY_2024_01_08, Room, RoomState, make_fleet, make_rooms
from truscl.sim.rooms import SHIFT_ARCHETYPES

FIVE_MINUTES = 300.0
WEEK_OF_READINGS = 7 * 24 * 12


def simulate(room: Room, steps: int, seconds: float = FIVE_MINUTES) -> list[RoomState]:
    states = []
    for _ in range(steps):
        room.advance(seconds)
        states.append(room.state)
    return states


def test_same_seed_same_rooms_and_same_history() -> None:
    # Prepare
    profile = make_rooms(3, seed=5)[2]

    # Execute
    first = simulate(Room(profile, seed=9, start=MONDAY_2024_01_08), 200)
    again = simulate(Room(profile, seed=9, start=MONDAY_2024_01_08), 200)
    other = simulate(Room(profile, seed=10, start=MONDAY_2024_01_08), 200)

    # Assert
    assert make_rooms(3, seed=5) == make_rooms(3, seed=5)
    assert make_rooms(3, seed=5) != make_rooms(3, seed=6)
    assert first == again
    assert first != other


def test_rooms_have_their_own_profiles() -> None:
    # Execute
    rooms = make_rooms(7, seed=1)

    # Assert
    assert len({room.name for room in rooms}) == 7
    assert len({room.schedule for room in rooms}) == 5  # every archetype's schedule appears
    assert len({room.co2_offset_ppm for room in rooms}) == 7  # every sensor errs its own way


@pytest.mark.parametrize("index", range(5))
def test_a_week_holds_both_classes(index: int) -> None:
    # Prepare
    profile = make_rooms(5, seed=2)[index]

    # Execute
    states = simulate(Room(profile, seed=index, start=MONDAY_2024_01_08), WEEK_OF_READINGS)

    # Assert
    occupied = np.array([s.occupied for s in states])
    motion = np.array([s.motion for s in states])
    assert 0.05 < occupied.mean() < 0.7
    assert 0.8 < motion[occupied].mean() <= 1.0  # the PIR misses some occupants
    assert motion[~occupied].mean() < 0.05  # and rarely fires in an empty room


def test_occupants_raise_co2() -> None:
    # Prepare
    room = Room(make_rooms(1, seed=4)[0], seed=4, start=MONDAY_2024_01_08)

    # Execute
    states = simulate(room, WEEK_OF_READINGS)

    # Assert
    co2 = np.array([s.co2_ppm for s in states])
    occupied = np.array([s.occupied for s in states])
    assert co2[occupied].mean() > co2[~occupied].mean() + 100
    assert co2.min() >= 400.0


def test_time_only_moves_forward() -> None:
    # Prepare
    room = Room(make_rooms(1, seed=0)[0], seed=0, start=MONDAY_2024_01_08)

    # Execute / Assert
    with pytest.raises(ValueError, match="forward"):
        room.advance(-1.0)


def fleet_data(n: int, seed: int, readings: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels per device, read through the agent's drivers."""
    data = {}
    for device in make_fleet(n, seed):
        with SensorSuite(device.pin_factory, device.i2c_bus) as suite:
            rows = []
            for _ in range(readings):
                device.step(FIVE_MINUTES)
                rows.append(suite.read(device.now))
        assert [r.faults for r in rows if not r.valid] == []  # healthy hardware, no alarms
        data[device.name] = (
            feature_matrix(DEFAULT_FEATURES, rows),
            np.array([r.label() for r in rows]),
        )
    return data


def logistic_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Train on the first half of the time line, test on the second (Newton's method)."""
    half = len(x) // 2
    mean, std = x[:half].mean(axis=0), x[:half].std(axis=0) + 1e-9
    design = np.c_[np.ones(len(x)), (x - mean) / std]
    train, test = design[:half], design[half:]
    w = np.zeros(design.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-train @ w))
        hessian = train.T @ (train * (p * (1 - p))[:, None]) + 1e-3 * np.eye(len(w))
        w -= np.linalg.solve(hessian, train.T @ (p - y[:half]) + 1e-3 * w)
    return float(((test @ w > 0) == y[half:]).mean())


@pytest.fixture(scope="module")
def fleet() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return fleet_data(5, seed=7, readings=1000)


def test_devices_see_different_distributions(
    fleet: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    # Execute
    means = np.array([x.mean(axis=0) for x, _ in fleet.values()])
    rates = np.array([y.mean() for _, y in fleet.values()])

    # Assert: non-IID in the label and in every feature
    assert rates.max() - rates.min() > 0.15
    spread = means.max(axis=0) - means.min(axis=0)
    assert spread[0] > 0.5  # temperature, degC
    assert spread[1] > 5.0  # humidity, %
    assert spread[2] > 50.0  # light, lux
    assert spread[3] > 100.0  # CO2, ppm


def test_occupancy_is_learnable_but_not_trivial(
    fleet: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    # Execute
    accuracies = {name: logistic_accuracy(x, y) for name, (x, y) in fleet.items()}

    # Assert
    for name, accuracy in accuracies.items():
        assert 0.78 < accuracy < 0.98, f"{name}: {accuracy:.3f}"
    assert 0.84 < float(np.mean(list(accuracies.values()))) < 0.95


def test_shift_rooms_differ_by_their_hours_alone() -> None:
    # Execute
    rooms = make_rooms(5, seed=3, archetypes=SHIFT_ARCHETYPES)

    # Assert: one schedule each; sizes and people drawn as for any fleet
    assert len({room.schedule for room in rooms}) == 5
    assert {room.name.rsplit("-", 1)[0] for room in rooms} == {
        archetype.name for archetype in SHIFT_ARCHETYPES
    }


def test_a_night_shift_is_in_when_a_day_office_is_out() -> None:
    # Prepare: a weekday of each, read as the sensors' truth every five minutes
    day, night = make_rooms(2, seed=4, archetypes=SHIFT_ARCHETYPES)

    # Execute
    by_day = simulate(Room(day, seed=1, start=MONDAY_2024_01_08), WEEK_OF_READINGS // 7)
    by_night = simulate(Room(night, seed=1, start=MONDAY_2024_01_08), WEEK_OF_READINGS // 7)

    # Assert: each is mostly in while the other is mostly out
    def share_in(states: list[RoomState], hours: range) -> float:
        at = [s.occupied for s in states if int((s.time % 86400) // 3600) in hours]
        return float(np.mean(at))

    office_hours, night_hours = range(9, 17), range(0, 6)
    assert share_in(by_day, office_hours) > 0.5 > 0.1 > share_in(by_day, night_hours)
    assert share_in(by_night, night_hours) > 0.5 > 0.1 > share_in(by_night, office_hours)


def test_make_rooms_needs_an_archetype() -> None:
    with pytest.raises(ValueError, match="archetype"):
        make_rooms(2, seed=0, archetypes=())
