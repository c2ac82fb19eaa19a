"""The named inputs and labels a task may learn from, and the sensors each one needs.

A task file names its features and its label; a device builds its model's inputs from them,
in the task's order, and refuses a task that needs a sensor it does not have. Raw features are
a sensor's quantity as read; derived ones are computed from a reading (the hour of day from its
timestamp, the humidity ratio from the BME280's three quantities). Sensors are named as the
agent's health book names them (``bme280``, ``light``, ``co2``, ``pir``).

The core imports no role, so a reading is anything shaped like :class:`truscl.agent.Reading`
(:class:`Sample`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from truscl.errors import ConfigError

SECONDS_PER_DAY = 86400.0


class Sample(Protocol):
    """What a feature is computed from: one reading of a device's sensors."""

    @property
    def timestamp(self) -> float: ...  # epoch seconds (UTC)
    @property
    def temperature_c(self) -> float: ...
    @property
    def humidity_pct(self) -> float: ...
    @property
    def pressure_hpa(self) -> float: ...
    @property
    def light_lux(self) -> float: ...
    @property
    def co2_ppm(self) -> float: ...
    @property
    def motion(self) -> bool: ...


@dataclass(frozen=True)
class Feature:
    """One model input: how to compute it from a reading, the sensors that takes, and, for a
    derived feature with one, its natural range (the task file may then leave it out)."""

    name: str
    sensors: frozenset[str]
    compute: Callable[[Sample], float]
    natural_range: tuple[float, float] | None = None


def _hour_angle(sample: Sample) -> float:
    """The time of day in UTC as an angle: midnight 0, noon pi, continuous across midnight."""
    return 2 * math.pi * (sample.timestamp % SECONDS_PER_DAY) / SECONDS_PER_DAY


def humidity_ratio(temperature_c: float, humidity_pct: float, pressure_hpa: float) -> float:
    """Grams of water vapour per kilogram of dry air.

    Saturation vapour pressure by the Magnus formula over water (Sonntag 1990 constants,
    6.112 hPa, 17.62, 243.12 degC; within 0.1 % from -45 to 60 degC), the vapour pressure as
    the relative humidity's share of it, and the ratio of the molar masses of water and dry
    air (0.62198) for ``W = 621.98 e / (p - e)``. Unlike relative humidity it does not move
    with the temperature alone: people breathing raise it.
    """
    saturation = 6.112 * math.exp(17.62 * temperature_c / (243.12 + temperature_c))
    vapour = humidity_pct / 100.0 * saturation
    return 621.98 * vapour / (pressure_hpa - vapour)


def _raw(name: str, sensor: str) -> Feature:
    return Feature(name, frozenset({sensor}), lambda sample: float(getattr(sample, name)))


FEATURES: dict[str, Feature] = {
    feature.name: feature
    for feature in (
        _raw("temperature_c", "bme280"),
        _raw("humidity_pct", "bme280"),
        _raw("pressure_hpa", "bme280"),
        _raw("light_lux", "light"),
        _raw("co2_ppm", "co2"),
        # The clock needs no sensor. Two features, so that 23:59 and 00:00 are neighbours.
        Feature("hour_sin", frozenset(), lambda s: math.sin(_hour_angle(s)), (-1.0, 1.0)),
        Feature("hour_cos", frozenset(), lambda s: math.cos(_hour_angle(s)), (-1.0, 1.0)),
        Feature(
            "humidity_ratio",
            frozenset({"bme280"}),
            lambda s: humidity_ratio(s.temperature_c, s.humidity_pct, s.pressure_hpa),
        ),
    )
}
"""Every feature a task may name, by name."""


@dataclass(frozen=True)
class Label:
    """What a model predicts (0 or 1), and the sensor it comes from."""

    name: str
    sensors: frozenset[str]
    compute: Callable[[Sample], int]


LABELS: dict[str, Label] = {
    "motion": Label("motion", frozenset({"pir"}), lambda sample: int(sample.motion)),
}
"""Every label a task may name: ``motion``, the PIR's occupancy."""

DEFAULT_FEATURES = ("temperature_c", "humidity_pct", "light_lux", "co2_ppm")
DEFAULT_LABEL = "motion"


def check_names(features: Sequence[str], label: str) -> None:
    """``ConfigError`` naming the first unknown or repeated feature, or an unknown label."""
    if not features:
        raise ConfigError("a task needs at least one feature")
    for name in features:
        if name not in FEATURES:
            raise ConfigError(f"unknown feature {name!r} (known: {', '.join(FEATURES)})")
    repeated = sorted({name for name in features if list(features).count(name) > 1})
    if repeated:
        raise ConfigError(f"feature {repeated[0]!r} is named twice")
    if label not in LABELS:
        raise ConfigError(f"unknown label {label!r} (known: {', '.join(LABELS)})")


def missing_sensor(
    features: Iterable[str], label: str, sensors: Iterable[str]
) -> tuple[str, str] | None:
    """The first (feature or label, sensor) the task needs and ``sensors`` lack; else None."""
    present = frozenset(sensors)
    needs = [(name, FEATURES[name].sensors) for name in features]
    needs.append((label, LABELS[label].sensors))
    for name, wanted in needs:
        for sensor in sorted(wanted - present):
            return name, sensor
    return None


def feature_matrix(features: Sequence[str], samples: Sequence[Sample]) -> np.ndarray:
    """The unscaled inputs, one row per sample and one column per feature in the task's order."""
    computes = [FEATURES[name].compute for name in features]
    rows = [[compute(sample) for compute in computes] for sample in samples]
    return np.array(rows, dtype=np.float64).reshape(len(samples), len(computes))


def labels(label: str, samples: Sequence[Sample]) -> np.ndarray:
    """The 0/1 targets of ``samples``, as float64."""
    compute = LABELS[label].compute
    return np.array([compute(sample) for sample in samples], dtype=np.float64)
