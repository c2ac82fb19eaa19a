"""What a task file may choose (features, label, model, min_readings) and the spec it makes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from harness import synthetic_readings

from truscl.errors import ConfigError
from truscl.hashing import keccak
from truscl.server.owner import task_privacy
from truscl.task import (
    MAX_MESSAGE_LIMIT,
    DpTerms,
    TaskSpec,
    load_task_file,
    max_params,
)
from truscl.wire import envelope
from truscl.wire.model import model_bytes

ROOT = Path(__file__).resolve().parents[1]
TASK = "0x" + "ab" * 32
CONTEXT = "0x" + "cd" * 32


def load(path: Path) -> TaskSpec:
    return load_task_file(path, task=TASK, context_hash=CONTEXT)


def test_the_example_tasks_make_their_models() -> None:
    three = load(ROOT / "deploy" / "tasks" / "three-features.toml")
    mlp = load(ROOT / "deploy" / "tasks" / "mlp.toml")

    assert three.features == ("light_lux", "co2_ppm", "humidity_ratio") and three.n_params == 4
    assert (mlp.model, mlp.hidden, mlp.n_params) == ("mlp", (8, 4), 97)
    assert (mlp.min_readings, mlp.window, three.min_readings) == (576, 864, 576)
    # hour_sin and hour_cos took their natural range [-1, 1]: unchanged by the scaling
    assert mlp.feature_offsets[-2:] == (0.0, 0.0) and mlp.feature_scales[-2:] == (1.0, 1.0)
    assert mlp.inputs(synthetic_readings(5)).shape == (5, 6)
    assert task_privacy(three) < three.dp.epsilon_budget  # owner init would accept both
    assert task_privacy(mlp) < mlp.dp.epsilon_budget


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('label = "motion"', 'label = "door"'), "unknown label 'door'"),
        (lambda t: t.replace('"light_lux",', '"lux",'), "unknown feature 'lux'"),
        (lambda t: t.replace('"light_lux",', '"co2_ppm",'), "'co2_ppm' is named twice"),
        (lambda t: t.replace('"light_lux",', "3,"), "features must be a list of feature names"),
        (lambda t: t.replace('"light_lux",', '"pressure_hpa",'), "ranges.pressure_hpa is required"),
        (lambda t: t.replace('model = "logistic"', 'model = "svm"'), "model must be one of"),
        (lambda t: t.replace("hidden = []", "hidden = [8]"), "hidden must be empty for a logistic"),
        (lambda t: t.replace("hidden = []", 'hidden = ["8"]'), "hidden must be a list of layer"),
        (
            lambda t: t.replace('model = "logistic"', 'model = "mlp"'),
            "hidden must list 1 to 2 layer sizes",
        ),
        (lambda t: t.replace("min_readings = 576", "min_readings = 900"), "min_readings (900)"),
        (lambda t: t.replace("min_readings = 576", "min_readings = 16"), "min_readings (16)"),
        (lambda t: t.replace("min_readings = 576", "min_readings = 0"), "min_readings must be"),
        (lambda t: t.replace("min_readings = 576", "min_readings = 5.5"), "min_readings has"),
    ],
)
def test_a_bad_choice_is_refused_naming_the_key(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    path = tmp_path / "task.toml"
    path.write_text(edit((ROOT / "deploy" / "task.toml").read_text()))

    with pytest.raises(ConfigError) as refused:
        load(path)

    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_a_derived_feature_without_a_natural_range_needs_one(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "tasks" / "three-features.toml").read_text()
    path = tmp_path / "task.toml"
    path.write_text(text.replace("humidity_ratio = [0.0, 20.0]", ""))

    with pytest.raises(ConfigError, match=r"ranges\.humidity_ratio is required"):
        load(path)


def big_mlp_task(tmp_path: Path, max_message: int) -> Path:
    """The example MLP task with 16,001 parameters (hidden layer of 2,000) and ``max_message``."""
    path = tmp_path / "task.toml"
    text = (ROOT / "deploy" / "tasks" / "mlp.toml").read_text()
    path.write_text(
        f"max_message = {max_message}\n" + text.replace("hidden = [8, 4]", "hidden = [2000]")
    )
    return path


def test_a_model_larger_than_one_message_of_the_task_is_refused_with_the_limit(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(big_mlp_task(tmp_path, 64 * 1024))

    assert max_params(64 * 1024) == 8064
    assert (
        "the mlp model has 16001 parameters; a task with max_message 65536 allows at most 8064"
        in str(refused.value)
    )


def test_the_same_model_is_one_message_of_a_task_with_larger_messages(tmp_path: Path) -> None:
    spec = load(big_mlp_task(tmp_path, 128 * 1024))

    # the model message as the owner releases it, read within the task's bound
    params = model_bytes(spec.make_model().init_params())
    message = envelope.encode("model", round=0, params=params, model_hash=keccak(params))
    assert spec.n_params == 16001 and len(message) <= spec.max_message
    assert envelope.decode(message, "model", spec.max_message)["params"] == params


def test_no_task_has_a_model_beyond_the_largest_message(tmp_path: Path) -> None:
    path = tmp_path / "task.toml"
    text = (ROOT / "deploy" / "tasks" / "mlp.toml").read_text()
    path.write_text(f"max_message = {MAX_MESSAGE_LIMIT}\n" + text.replace("[8, 4]", "[20000]"))

    with pytest.raises(ConfigError, match=f"allows at most {max_params(MAX_MESSAGE_LIMIT)} "):
        load(path)


def test_the_spec_keeps_the_choices_through_its_encoding() -> None:
    spec = load(ROOT / "deploy" / "tasks" / "mlp.toml")

    decoded = TaskSpec.decode(spec.encode())

    assert decoded == spec and decoded.hash() == spec.hash()
    assert decoded.hidden == (8, 4) and decoded.label == "motion"


def test_min_readings_defaults_to_the_window_and_sets_the_worst_sampling_rate() -> None:
    spec = load(ROOT / "deploy" / "task.toml")
    full_windows = replace(spec, min_readings=0)  # 0 stands for the window

    assert full_windows.min_readings == 864
    assert spec.sampling_rate == 32 / 576 and full_windows.sampling_rate == 32 / 864
    assert spec.sampling_rate_for(700) == 32 / 700
    for outside in (575, 865):
        with pytest.raises(ValueError, match="576 to 864 readings"):
            spec.sampling_rate_for(outside)
    with pytest.raises(ConfigError, match="min_readings"):
        replace(spec, dp=DpTerms(batch_size=600))
