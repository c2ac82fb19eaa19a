"""The features and labels a task may name: their values, the sensors they need, their order."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from truscl.agent.health import SENSORS
from truscl.agent.sensors import Reading
from truscl.errors import ConfigError
from truscl.learning.features import (
    FEATURES,
    LABELS,
    check_names,
    feature_matrix,
    humidity_ratio,
    labels,
    missing_sensor,
)

MIDNIGHT = 1_704_672_000.0  # 2024-01-08 00:00:00 UTC
READING = Reading(MIDNIGHT + 6 * 3600, 21.5, 40.25, 1001.5, 350.0, 812.5, True)


def test_raw_features_are_the_readings_quantities_in_the_tasks_order() -> None:
    names = ["co2_ppm", "pressure_hpa", "temperature_c", "light_lux", "humidity_pct"]

    X = feature_matrix(names, [READING, replace(READING, co2_ppm=400.0)])

    np.testing.assert_array_equal(
        X, [[812.5, 1001.5, 21.5, 350.0, 40.25], [400.0, 1001.5, 21.5, 350.0, 40.25]]
    )


@pytest.mark.parametrize(
    ("seconds", "sin", "cos"),
    [(0, 0.0, 1.0), (6 * 3600, 1.0, 0.0), (12 * 3600, 0.0, -1.0), (18 * 3600, -1.0, 0.0)],
)
def test_the_hour_of_day_is_a_point_on_a_circle_in_utc(
    seconds: int, sin: float, cos: float
) -> None:
    # the same time of day on another day gives the same point
    for day in (0, 1, 365):
        reading = replace(READING, timestamp=MIDNIGHT + day * 86400 + seconds)

        (row,) = feature_matrix(["hour_sin", "hour_cos"], [reading])

        assert row == pytest.approx([sin, cos], abs=1e-12)


def test_a_minute_before_and_after_midnight_are_neighbours() -> None:
    before, after = (replace(READING, timestamp=MIDNIGHT + s) for s in (-60, 60))

    X = feature_matrix(["hour_sin", "hour_cos"], [before, after])

    assert np.linalg.norm(X[0] - X[1]) < 0.01


def test_the_humidity_ratio_matches_the_psychrometric_tables() -> None:
    # ASHRAE's saturation pressure at 20 degC, 2.339 kPa, gives 7.26 g/kg at 50 %RH at sea
    # level and 14.75 g/kg saturated (with its enhancement factor); Magnus is within 1 %
    assert humidity_ratio(20.0, 50.0, 1013.25) == pytest.approx(7.26, rel=0.01)
    assert humidity_ratio(20.0, 100.0, 1013.25) == pytest.approx(14.75, rel=0.01)
    # dry air holds none; lower pressure (altitude) means more water per kg of air
    assert humidity_ratio(25.0, 0.0, 1013.25) == 0.0
    assert humidity_ratio(20.0, 50.0, 900.0) > humidity_ratio(20.0, 50.0, 1013.25)
    (row,) = feature_matrix(["humidity_ratio"], [READING])
    assert row[0] == humidity_ratio(21.5, 40.25, 1001.5)


def test_every_sensor_a_feature_or_label_needs_is_one_the_agent_knows() -> None:
    for item in (*FEATURES.values(), *LABELS.values()):
        assert item.sensors <= set(SENSORS), item.name
    assert FEATURES["co2_ppm"].sensors == {"co2"} and FEATURES["hour_sin"].sensors == set()
    assert FEATURES["humidity_ratio"].sensors == {"bme280"} and LABELS["motion"].sensors == {"pir"}


def test_the_missing_sensor_is_named_with_the_feature_that_needs_it() -> None:
    task = ["hour_sin", "temperature_c", "co2_ppm"]

    assert missing_sensor(task, "motion", SENSORS) is None
    assert missing_sensor(task, "motion", {"bme280", "pir", "light"}) == ("co2_ppm", "co2")
    assert missing_sensor(task, "motion", {"bme280", "co2"}) == ("motion", "pir")
    assert missing_sensor(["hour_sin", "hour_cos"], "motion", {"pir"}) is None


def test_labels_are_the_pirs_motion() -> None:
    readings = [READING, replace(READING, motion=False)]

    np.testing.assert_array_equal(labels("motion", readings), [1.0, 0.0])


@pytest.mark.parametrize(
    ("features", "label", "message"),
    [
        (["co2"], "motion", "unknown feature 'co2'"),
        (["co2_ppm", "light_lux", "co2_ppm"], "motion", "feature 'co2_ppm' is named twice"),
        ([], "motion", "at least one feature"),
        (["co2_ppm"], "presence", "unknown label 'presence'"),
    ],
)
def test_unknown_or_repeated_names_are_refused(
    features: list[str], label: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_names(features, label)


def test_no_feature_is_nan_for_a_healthy_reading() -> None:
    X = feature_matrix(list(FEATURES), [READING])

    assert X.shape == (1, len(FEATURES)) and all(math.isfinite(v) for v in X[0])
