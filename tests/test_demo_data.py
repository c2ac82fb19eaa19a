"""What the demo evaluates on: every room's held-out week in a small fleet, a bounded sample
drawn from the seed in a large one, and never a reading a device trains on."""

from __future__ import annotations

from truscl.demo.common import (
    EVALUATION_ROOMS,
    READINGS_PER_ROUND,
    TEST_DAYS,
    WINDOW,
    evaluation_note,
    evaluation_rooms,
    sensed_readings,
)
from truscl.demo.common import test_set as held_out_weeks
from truscl.demo.data import SimulatedRooms
from truscl.demo.fleet import READ_CPU_S, ROUND_SECONDS_REAL, SENSING_CPU, read_period
from truscl.sim.rooms import make_rooms

WEEK = TEST_DAYS * 288  # readings of one room's held-out week, one every five minutes


def test_a_small_fleet_evaluates_on_every_rooms_held_out_week() -> None:
    # Prepare
    data = SimulatedRooms(2, seed=7)
    # Execute
    evaluated = data.test_set()
    # Assert: the set the demo always evaluated on, room after room, and no note about it
    assert data.evaluated == [0, 1] and data.note == ""
    assert evaluated == held_out_weeks(make_rooms(2, 7), 7)
    assert len(evaluated) == 2 * WEEK
    assert evaluation_rooms(EVALUATION_ROOMS, 7) == list(range(EVALUATION_ROOMS))


def test_a_large_fleet_evaluates_on_a_bounded_sample_drawn_from_the_seed() -> None:
    # Execute
    rooms = evaluation_rooms(1000, seed=7)
    # Assert: bounded, distinct rooms of the fleet, in order, the same on every run
    assert len(rooms) == EVALUATION_ROOMS == len(set(rooms))
    assert rooms == sorted(rooms) and 0 <= rooms[0] and rooms[-1] < 1000
    assert rooms == evaluation_rooms(1000, seed=7)
    assert rooms != evaluation_rooms(1000, seed=8)
    assert rooms != list(range(EVALUATION_ROOMS))  # drawn, not the first rooms
    note = evaluation_note(1000, 7)
    assert f"{EVALUATION_ROOMS} of the 1000 rooms" in note and ", ".join(map(str, rooms)) in note


def test_a_sampled_rooms_held_out_week_is_the_one_the_whole_fleet_would_evaluate_on() -> None:
    # Prepare
    profiles = make_rooms(2, 7)
    # Execute
    alone = held_out_weeks(profiles, 7, rooms=[1])
    # Assert: room 1's week is the same readings whether or not room 0 is simulated
    assert alone == held_out_weeks(profiles, 7)[WEEK:]


def test_the_sample_is_held_out_and_the_baseline_pools_the_same_rooms_devices() -> None:
    # Prepare: a fleet past the bound; one reading of each device's past keeps this quick
    data = SimulatedRooms(EVALUATION_ROOMS + 5, seed=3)
    # Execute
    pooled = data.pooled(rounds=0, window=1)
    room = data.evaluated[-1]
    held_out = held_out_weeks(data.profiles, 3, rooms=[room])
    # Assert
    assert len(data.evaluated) == EVALUATION_ROOMS and data.note
    assert pooled == [sensed_readings(data.profiles[i], i, 3, 1)[0] for i in data.evaluated]
    trained = sensed_readings(data.profiles[room], room, 3, WINDOW + 100 * READINGS_PER_ROUND)
    assert held_out[0].timestamp > trained[-1].timestamp  # a later week, after 100 rounds


def test_a_large_fleets_simulated_sensors_read_slower_to_keep_to_their_share() -> None:
    # Execute
    periods = {devices: read_period(devices) for devices in (1, 10, 26, 27, 100, 1000)}
    # Assert: small fleets sense a round's readings in ROUND_SECONDS_REAL, as always; no fleet's
    # sensors want more than SENSING_CPU of a core
    assert periods[1] == periods[10] == periods[26] == ROUND_SECONDS_REAL / READINGS_PER_ROUND
    assert periods[26] < periods[27] < periods[100] < periods[1000]
    for devices, period in periods.items():
        assert devices * READ_CPU_S / period <= SENSING_CPU + 1e-12
