"""The owner's and the aggregator's files: what a user writes loads, mistakes name file and key."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from truscl.errors import ConfigError
from truscl.server.aggregator_service import run_aggregator
from truscl.server.config import AggregatorConfig, GuardianConfig, OwnerConfig
from truscl.server.owner import task_privacy
from truscl.task import load_task_file

ROOT = Path(__file__).resolve().parents[1]
TASK = "0x" + "ab" * 32
CONTEXT = "0x" + "cd" * 32


def test_the_example_task_file_makes_the_demo_terms() -> None:
    spec = load_task_file(ROOT / "deploy" / "task.toml", task=TASK, context_hash=CONTEXT)

    assert (spec.task, spec.context_hash, spec.rounds, spec.quorum) == (TASK, CONTEXT, 10, 3)
    assert spec.feature_offsets == (22.5, 45.0, 500.0, 1200.0)
    assert spec.dp.epsilon_budget == 8.0 and spec.dp.delta == 1e-5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("rounds = 10", 'rounds = "10"'), "rounds has the wrong type"),
        (lambda t: t.replace("quorum = 3", "quorums = 3"), "quorum is required"),
        (lambda t: t + "colour = 1\n", "unknown key optimiser.colour"),
        (lambda t: t.replace("clip_norm = 1.0", "clip_norm = -1.0"), "clip_norm"),
        (lambda t: t.replace("co2_ppm = [400.0, 2000.0]", "co2_ppm = [1]"), "ranges.co2_ppm"),
        (lambda t: t.replace('"co2_ppm"]', '"co2"]'), "unknown feature 'co2'"),
        (lambda t: t.replace('he_profile = "ckks-4096-60-49"', 'he_profile = "x"'), "he_profile"),
        (lambda t: t.replace("round_seconds = 60.0", "round_seconds = 0"), "round_seconds"),
        (lambda t: t.replace("min_cohort = 2", "min_cohort = 1"), "min_cohort must be at least 2"),
    ],
)
def test_a_bad_task_file_is_refused_naming_the_key(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    path = tmp_path / "task.toml"
    path.write_text(edit((ROOT / "deploy" / "task.toml").read_text()))

    with pytest.raises(ConfigError) as refused:
        load_task_file(path, task=TASK, context_hash=CONTEXT)

    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_the_example_service_files_load_and_resolve_paths(tmp_path: Path) -> None:
    owner = OwnerConfig.load(ROOT / "deploy" / "owner.toml")
    aggregator = AggregatorConfig.load(ROOT / "deploy" / "aggregator.toml")
    moved = tmp_path / "owner.toml"
    moved.write_text(
        (ROOT / "deploy" / "owner.toml").read_text().replace("/var/lib/truscl-owner/", "")
    )

    assert owner.broker.username == "owner" and owner.broker.ca is not None
    assert owner.he_mode == "threshold" and [n for n, _ in owner.guardians] == ["guardian-1"]
    assert aggregator.expected_devices == 0 and aggregator.broker.port == 8883
    assert aggregator.workers == 1
    assert OwnerConfig.load(moved).key == tmp_path / "owner.key"


def test_the_example_guardian_file_loads() -> None:
    guardian = GuardianConfig.load(ROOT / "deploy" / "guardian.toml")

    assert guardian.name == "guardian-1" and guardian.broker.username == "guardian-1"
    assert guardian.task == "0x" + "00" * 31 + "01"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('he_mode = "threshold"', 'he_mode = "both"'), "he_mode must be"),
        (lambda t: t.replace("task = ", "# task = "), "threshold mode (the default) needs task"),
        (lambda t: t.replace("guardian-1 = ", "guardian-1 = '0x12' #"), "guardians.guardian-1"),
        (lambda t: t.replace("guardian-1 = ", "owner = "), "the owner is a key holder"),
        (
            lambda t: t.replace('he_mode = "threshold"', 'he_mode = "single-key"'),
            "[guardians] share a threshold key",
        ),
    ],
)
def test_a_bad_owner_file_is_refused_naming_the_key(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    path = tmp_path / "owner.toml"
    path.write_text(edit((ROOT / "deploy" / "owner.toml").read_text()))

    with pytest.raises(ConfigError) as refused:
        OwnerConfig.load(path)

    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name = "guardian-1"', 'name = "owner"'), "guardian.name must not"),
        (lambda t: t.replace('name = "guardian-1"', 'name = "a/b"'), "guardian.name"),
        (lambda t: t.replace("owner = ", "owner = '0x1' #"), "owner must be an address"),
        (lambda t: t.replace("state = ", "states = "), "guardian.state is required"),
    ],
)
def test_a_bad_guardian_file_is_refused_naming_the_key(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    path = tmp_path / "guardian.toml"
    path.write_text(edit((ROOT / "deploy" / "guardian.toml").read_text()))

    with pytest.raises(ConfigError) as refused:
        GuardianConfig.load(path)

    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("expected_devices = 0", "expected_devices = -1"), "expected_devices"),
        (lambda t: t.replace('username = "aggregator"\n', ""), "[broker]: a broker username"),
        (lambda t: t.replace("port = 8883", "port = 0"), "broker.port must be a TCP port"),
        (lambda t: t.replace("contract = ", "contract = '0x12' #"), "chain.contract must be"),
        (lambda t: t.replace("archive = ", "archives = "), "aggregator.archive is required"),
        (lambda t: t.replace("workers = 1", "workers = 0"), "aggregator.workers must be from 1"),
        (lambda t: t.replace("workers = 1", "workers = '2'"), "aggregator.workers"),
    ],
)
def test_a_bad_aggregator_file_is_refused_naming_the_key(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(edit((ROOT / "deploy" / "aggregator.toml").read_text()))

    with pytest.raises(ConfigError) as refused:
        AggregatorConfig.load(path)

    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_an_aggregator_of_two_workers_without_the_second_login_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(
        (ROOT / "deploy" / "aggregator.toml").read_text().replace("workers = 1", "workers = 2")
    )

    with pytest.raises(ConfigError, match="aggregator-1 with /etc/truscl/broker/password-1"):
        run_aggregator(AggregatorConfig.load(path), threading.Event())


def test_a_task_whose_rounds_exceed_the_budget_is_refused_with_the_figures(
    tmp_path: Path,
) -> None:
    path = tmp_path / "task.toml"
    path.write_text(
        (ROOT / "deploy" / "task.toml")
        .read_text()
        .replace("rounds = 10", "rounds = 40")
        .replace("epsilon_budget = 8.0", "epsilon_budget = 4.0")
    )
    spec = load_task_file(path, task=TASK, context_hash=CONTEXT)

    with pytest.raises(ConfigError) as refused:
        task_privacy(spec)

    message = str(refused.value)
    assert message.startswith("40 rounds would spend epsilon ")
    assert "over the budget 4" in message and "at most 3 rounds" in message
    # The task's figure is its worst case, a device training on min_readings (576) readings
    # every round; with full windows only (the demo's task) it is 3.976
    within = load_task_file(ROOT / "deploy" / "task.toml", task=TASK, context_hash=CONTEXT)
    assert 5.9 < task_privacy(within) < 6.0
    path.write_text((ROOT / "deploy" / "task.toml").read_text().replace("min_readings = 576", ""))
    full_windows = load_task_file(path, task=TASK, context_hash=CONTEXT)
    assert full_windows.min_readings == 864 and 3.9 < task_privacy(full_windows) < 4.0
