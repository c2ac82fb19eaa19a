"""Rooms whose air, light and people the simulated sensors measure.

Each room is a well-mixed box: occupants breathe out CO2 and moisture and give off heat,
ventilation pulls CO2 and moisture back toward outdoor air, a thermostat holds a setpoint,
daylight follows the sun through a window and lamps go on when people need them. Who is in the
room follows its own weekly schedule, so rooms differ in what their data look like (non-IID),
and the PIR label is noisy and the physics lag the people, so occupancy is learnable from the
environment but not perfectly.

Randomness comes from ``numpy.random.default_rng``: this is a simulation, not security.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

OUTDOOR_CO2_PPM = 420.0
SEA_LEVEL_HPA = 1013.25
HPA_PER_METRE = 0.12  # barometric lapse near sea level
SUBSTEP_S = 60.0
"""Longest physics step: short enough for the occupancy chain and the exponential decays."""

CO2_PPM_M3_PER_PERSON_HOUR = 18_000.0  # 18 L/h of CO2 per seated adult, as ppm in 1 m3
HEAT_C_M3_PER_PERSON_HOUR = 8.0  # ~100 W per person against the room's thermal mass
MOISTURE_PCT_M3_PER_PERSON_HOUR = 60.0  # ~50 g/h of water vapour per person
HEATER_TIME_CONSTANT_H = 0.5
HEAT_LOSS_PER_H = 0.06
SETBACK_C = 3.0  # the thermostat lowers its setpoint overnight
COMFORT_HOURS = (6.0, 22.0)
SUNRISE_H, SUNSET_H = 7.0, 19.0
DARK_LUX = 250.0  # below this, occupants switch the lamps on
BACKGROUND_PRESENCE = 0.02  # cleaners, a forgotten item: visits outside any schedule
PIR_DETECTION = 0.9
PIR_FALSE_ALARM = 0.01
WEATHER_SIGMA_HPA = 6.0
WEATHER_TIME_CONSTANT_H = 48.0


@dataclass(frozen=True)
class OccupancyWindow:
    """Part of a week when the room is in use: on ``days`` (0 = Monday), from ``start_hour``
    to ``end_hour`` (UTC), the room is occupied with probability ``presence``."""

    days: frozenset[int]
    start_hour: float
    end_hour: float
    presence: float

    def covers(self, weekday: int, hour: float) -> bool:
        return weekday in self.days and self.start_hour <= hour < self.end_hour


WEEKDAYS = frozenset(range(5))
WEEKEND = frozenset({5, 6})
EVERY_DAY = frozenset(range(7))


@dataclass(frozen=True)
class RoomProfile:
    """What makes one room's data unlike another's: size, climate, use and sensor errors."""

    name: str
    volume_m3: float
    elevation_m: float
    outdoor_temperature_c: float
    heating_setpoint_c: float
    base_humidity_pct: float
    daylight_lux: float
    """Daylight at the sensor at noon under a clear sky: the window's size and orientation."""
    lamp_lux: float
    lamp_use: float
    """Probability that occupants switch the lamps on when it is dark."""
    schedule: tuple[OccupancyWindow, ...]
    dwell_minutes: float
    """Mean stay of a visit: short bursts in a meeting room, long ones in a bedroom."""
    people: int
    air_changes_per_hour: float
    temperature_offset_c: float
    humidity_offset_pct: float
    light_factor: float
    co2_offset_ppm: float

    def presence(self, weekday: int, hour: float) -> float:
        """Probability the room is occupied at this time of the week."""
        shares = [w.presence for w in self.schedule if w.covers(weekday, hour)]
        return max(shares, default=BACKGROUND_PRESENCE)


ARCHETYPES: tuple[RoomProfile, ...] = (
    RoomProfile(
        name="office",
        volume_m3=60.0,
        elevation_m=20.0,
        outdoor_temperature_c=6.0,
        heating_setpoint_c=21.0,
        base_humidity_pct=40.0,
        daylight_lux=900.0,
        lamp_lux=450.0,
        lamp_use=0.9,
        schedule=(OccupancyWindow(WEEKDAYS, 8.0, 17.5, 0.85),),
        dwell_minutes=90.0,
        people=3,
        air_changes_per_hour=1.5,
        temperature_offset_c=0.0,
        humidity_offset_pct=0.0,
        light_factor=1.0,
        co2_offset_ppm=0.0,
    ),
    RoomProfile(
        name="living-room",
        volume_m3=50.0,
        elevation_m=5.0,
        outdoor_temperature_c=6.0,
        heating_setpoint_c=21.5,
        base_humidity_pct=48.0,
        daylight_lux=600.0,
        lamp_lux=250.0,
        lamp_use=0.9,
        schedule=(
            OccupancyWindow(EVERY_DAY, 18.0, 23.0, 0.85),
            OccupancyWindow(WEEKEND, 10.0, 18.0, 0.55),
        ),
        dwell_minutes=75.0,
        people=2,
        air_changes_per_hour=1.0,
        temperature_offset_c=0.0,
        humidity_offset_pct=0.0,
        light_factor=1.0,
        co2_offset_ppm=0.0,
    ),
    RoomProfile(
        name="meeting-room",
        volume_m3=40.0,
        elevation_m=35.0,
        outdoor_temperature_c=6.0,
        heating_setpoint_c=20.5,
        base_humidity_pct=38.0,
        daylight_lux=400.0,
        lamp_lux=500.0,
        lamp_use=0.95,
        schedule=(OccupancyWindow(WEEKDAYS, 9.0, 17.0, 0.4),),
        dwell_minutes=45.0,
        people=6,
        air_changes_per_hour=3.0,
        temperature_offset_c=0.0,
        humidity_offset_pct=0.0,
        light_factor=1.0,
        co2_offset_ppm=0.0,
    ),
    RoomProfile(
        name="bedroom",
        volume_m3=35.0,
        elevation_m=8.0,
        outdoor_temperature_c=6.0,
        heating_setpoint_c=19.0,
        base_humidity_pct=52.0,
        daylight_lux=500.0,
        lamp_lux=200.0,
        lamp_use=0.35,
        schedule=(
            OccupancyWindow(EVERY_DAY, 0.0, 7.0, 0.9),
            OccupancyWindow(EVERY_DAY, 22.5, 24.0, 0.8),
        ),
        dwell_minutes=240.0,
        people=2,
        air_changes_per_hour=0.5,
        temperature_offset_c=0.0,
        humidity_offset_pct=0.0,
        light_factor=1.0,
        co2_offset_ppm=0.0,
    ),
    RoomProfile(
        name="kitchen",
        volume_m3=30.0,
        elevation_m=5.0,
        outdoor_temperature_c=6.0,
        heating_setpoint_c=20.0,
        base_humidity_pct=50.0,
        daylight_lux=700.0,
        lamp_lux=350.0,
        lamp_use=0.9,
        schedule=(
            OccupancyWindow(EVERY_DAY, 7.0, 8.5, 0.8),
            OccupancyWindow(EVERY_DAY, 12.0, 13.0, 0.6),
            OccupancyWindow(EVERY_DAY, 18.0, 20.0, 0.85),
        ),
        dwell_minutes=35.0,
        people=3,
        air_changes_per_hour=2.0,
        temperature_offset_c=0.0,
        humidity_offset_pct=0.0,
        light_factor=1.0,
        co2_offset_ppm=0.0,
    ),
)


_WORKROOM = ARCHETYPES[0]
SHIFT_ARCHETYPES: tuple[RoomProfile, ...] = (
    replace(_WORKROOM, name="day-office"),
    replace(
        _WORKROOM,
        name="night-shift",
        schedule=(
            OccupancyWindow(EVERY_DAY, 0.0, 6.0, 0.85),
            OccupancyWindow(EVERY_DAY, 22.0, 24.0, 0.85),
        ),
    ),
    replace(_WORKROOM, name="weekend-shop", schedule=(OccupancyWindow(WEEKEND, 9.0, 19.0, 0.8),)),
    replace(_WORKROOM, name="evening-club", schedule=(OccupancyWindow(WEEKDAYS, 17.0, 23.0, 0.7),)),
    replace(_WORKROOM, name="early-shift", schedule=(OccupancyWindow(EVERY_DAY, 5.0, 13.0, 0.8),)),
)
"""Work rooms alike but for their hours: by day, by night, at weekends only, in the evening,
from dawn. A room's hours decide what its thermostat, its daylight and its occupancy have in
common (a night shift works in the set-back cold), so what one device learns about the
environment and people does not hold for the next: the non-IID fleet of the harder task."""


def make_rooms(
    n: int, seed: int, archetypes: tuple[RoomProfile, ...] = ARCHETYPES
) -> list[RoomProfile]:
    """``n`` rooms cycling through ``archetypes``, each resized, re-climatised and given its
    own sensor errors, so no two devices see the same distribution."""
    if n < 1:
        raise ValueError(f"a fleet has at least one room, got {n}")
    if not archetypes:
        raise ValueError("a fleet needs at least one archetype")
    rng = np.random.default_rng(seed)
    climate_c = rng.uniform(0.0, 12.0)  # the fleet shares a town, rooms share its weather
    rooms = []
    for index in range(n):
        base = archetypes[index % len(archetypes)]
        rooms.append(
            replace(
                base,
                name=f"{base.name}-{index}",
                volume_m3=base.volume_m3 * rng.uniform(0.8, 1.25),
                elevation_m=base.elevation_m + rng.uniform(0.0, 30.0),
                outdoor_temperature_c=climate_c + rng.normal(0.0, 1.0),
                heating_setpoint_c=base.heating_setpoint_c + rng.normal(0.0, 0.7),
                base_humidity_pct=base.base_humidity_pct + rng.normal(0.0, 4.0),
                daylight_lux=base.daylight_lux * rng.uniform(0.7, 1.3),
                lamp_lux=base.lamp_lux * rng.uniform(0.8, 1.2),
                people=max(1, base.people + int(rng.integers(-1, 2))),
                air_changes_per_hour=base.air_changes_per_hour * rng.uniform(0.8, 1.25),
                temperature_offset_c=rng.normal(0.0, 0.5),
                humidity_offset_pct=rng.normal(0.0, 3.0),
                light_factor=rng.uniform(0.85, 1.15),
                co2_offset_ppm=rng.normal(0.0, 40.0),
            )
        )
    return rooms


@dataclass(frozen=True)
class RoomState:
    """The room's physical truth at ``time``, before any sensor error."""

    time: float
    temperature_c: float
    humidity_pct: float
    pressure_hpa: float
    light_lux: float
    co2_ppm: float
    occupied: bool
    motion: bool


def _week_position(epoch_s: float) -> tuple[int, float]:
    """(weekday, hour) in UTC, so a simulation means the same on every machine."""
    days, seconds = divmod(epoch_s, 86_400.0)
    weekday = (int(days) + 3) % 7  # 1970-01-01 was a Thursday
    return weekday, seconds / 3600.0


class Room:
    """One room's evolution in time, driven by its profile and a seeded random source."""

    def __init__(self, profile: RoomProfile, seed: int, start: float) -> None:
        self.profile = profile
        self._rng = np.random.default_rng(seed)
        self._time = start
        self._temperature_c = profile.heating_setpoint_c
        self._moisture_pct = 0.0  # humidity above the room's base, from people
        self._co2_ppm = OUTDOOR_CO2_PPM
        self._weather_hpa = 0.0
        self._day = -1
        self._cloudiness = 1.0
        weekday, hour = _week_position(start)
        self._occupants = self._arrivals() if self._chance(profile.presence(weekday, hour)) else 0
        self._lamps_on = False
        self._daylight_lux = 0.0
        self._update_light()
        self._motion = self._pir_fires()

    def _chance(self, probability: float) -> bool:
        return bool(self._rng.random() < probability)

    def _arrivals(self) -> int:
        return int(self._rng.integers(1, self.profile.people + 1))

    @property
    def state(self) -> RoomState:
        _, hour = _week_position(self._time)
        humidity = (
            self.profile.base_humidity_pct
            + self._moisture_pct
            - 2.0 * (self._temperature_c - self._setpoint(hour))  # warmer air holds more: RH falls
        )
        return RoomState(
            time=self._time,
            temperature_c=self._temperature_c,
            humidity_pct=min(max(humidity, 5.0), 95.0),
            pressure_hpa=SEA_LEVEL_HPA
            + self._weather_hpa
            - HPA_PER_METRE * self.profile.elevation_m,
            light_lux=self._daylight_lux + (self.profile.lamp_lux if self._lamps_on else 0.0),
            co2_ppm=self._co2_ppm,
            occupied=self._occupants > 0,
            motion=self._motion,
        )

    def advance(self, seconds: float) -> None:
        """Move the room ``seconds`` forward, in steps of at most ``SUBSTEP_S``."""
        if seconds < 0:
            raise ValueError(f"time only moves forward, got {seconds} s")
        remaining = seconds
        while remaining > 0:
            dt = min(SUBSTEP_S, remaining)
            self._substep(dt)
            remaining -= dt
        self._motion = self._pir_fires()

    def _pir_fires(self) -> bool:
        """A PIR sees most occupants (not one asleep or still) and, rarely, a draught."""
        return self._chance(PIR_DETECTION if self._occupants else PIR_FALSE_ALARM)

    def _substep(self, dt: float) -> None:
        self._time += dt
        profile = self.profile
        hours = dt / 3600.0
        weekday, hour = _week_position(self._time)

        # Occupancy: a two-state chain whose mean stay is the dwell time and whose long-run
        # share of occupied time is the schedule's presence.
        presence = min(profile.presence(weekday, hour), 0.98)
        leave_rate = 60.0 / profile.dwell_minutes
        arrive_rate = leave_rate * presence / (1.0 - presence)
        if self._occupants:
            if self._chance(1.0 - math.exp(-leave_rate * hours)):
                self._occupants = 0
                self._lamps_on = self._lamps_on and self._chance(0.1)  # sometimes forgotten
        elif self._chance(1.0 - math.exp(-arrive_rate * hours)):
            self._occupants = self._arrivals()
            self._lamps_on = self._daylight_lux < DARK_LUX and self._chance(profile.lamp_use)
        elif self._lamps_on and self._chance(hours):  # someone passing turns forgotten lamps off
            self._lamps_on = False
        self._update_light()

        # CO2 and moisture: exact decay toward the level occupants and ventilation balance at.
        decay = math.exp(-profile.air_changes_per_hour * hours)
        per_m3 = self._occupants / profile.volume_m3
        co2_eq = (
            OUTDOOR_CO2_PPM + CO2_PPM_M3_PER_PERSON_HOUR * per_m3 / profile.air_changes_per_hour
        )
        self._co2_ppm = co2_eq + (self._co2_ppm - co2_eq) * decay
        moisture_eq = MOISTURE_PCT_M3_PER_PERSON_HOUR * per_m3 / profile.air_changes_per_hour
        self._moisture_pct = moisture_eq + (self._moisture_pct - moisture_eq) * decay

        # Temperature: losses to outdoors, a thermostat that only heats, and body heat.
        outdoor_c = profile.outdoor_temperature_c + 4.0 * math.sin(2 * math.pi * (hour - 9) / 24)
        heating = max(self._setpoint(hour) - self._temperature_c, 0.0) / HEATER_TIME_CONSTANT_H
        body_heat = HEAT_C_M3_PER_PERSON_HOUR * per_m3
        drift = heating + body_heat + HEAT_LOSS_PER_H * (outdoor_c - self._temperature_c)
        self._temperature_c += drift * hours + self._rng.normal(0.0, 0.01)

        # Pressure: weather as a slow mean-reverting random walk.
        pull = hours / WEATHER_TIME_CONSTANT_H
        kick = WEATHER_SIGMA_HPA * math.sqrt(2 * pull)
        self._weather_hpa += -self._weather_hpa * pull + kick * self._rng.normal()

    def _setpoint(self, hour: float) -> float:
        """The thermostat's target: the profile's setpoint by day, set back at night."""
        comfort = COMFORT_HOURS[0] <= hour < COMFORT_HOURS[1]
        return self.profile.heating_setpoint_c - (0.0 if comfort else SETBACK_C)

    def _update_light(self) -> None:
        """Daylight through the window under today's clouds; lamps go on if it gets dark."""
        day = int(self._time // 86_400)
        if day != self._day:
            self._day = day
            self._cloudiness = self._rng.uniform(0.2, 1.0)
        _, hour = _week_position(self._time)
        sun = max(math.sin(math.pi * (hour - SUNRISE_H) / (SUNSET_H - SUNRISE_H)), 0.0)
        self._daylight_lux = self.profile.daylight_lux * self._cloudiness * sun
        if self._occupants and not self._lamps_on and self._daylight_lux < DARK_LUX:
            self._lamps_on = self._chance(self.profile.lamp_use * 0.05)
