"""RDP accounting against the published reference, and the device's persistent ledger."""

import math
import os
import stat
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from truscl.errors import ConfigError
from truscl.privacy import PrivacyLedger, rdp_epsilon
from truscl.privacy.accounting import pld_epsilon, rounds_within_budget, task_epsilon

DELTA = 1e-5


def test_reference_value_from_dp_sgd_on_mnist() -> None:
    # q = 256/60000, sigma = 1.1, 14063 steps (60 epochs), delta = 1e-5
    assert rdp_epsilon(256 / 60000, 1.1, 14063, DELTA) == pytest.approx(2.597, rel=1e-3)


def test_no_noise_means_no_privacy() -> None:
    assert rdp_epsilon(0.1, 0.0, 1, DELTA) == float("inf")


def test_empty_ledger_has_spent_nothing() -> None:
    assert PrivacyLedger().epsilon(DELTA) == 0.0


def test_repeated_rounds_compose_like_one_long_run() -> None:
    # Prepare
    ledger = PrivacyLedger()

    # Execute
    for _ in range(3):
        ledger.record(0.01, 1.2, 100)

    # Assert
    assert ledger.epsilon(DELTA) == pytest.approx(rdp_epsilon(0.01, 1.2, 300, DELTA), rel=1e-12)
    assert len(ledger.rounds) == 3


def test_epsilon_if_predicts_the_next_round_without_recording_it() -> None:
    # Prepare
    ledger = PrivacyLedger()
    ledger.record(0.02, 1.0, 50)
    before = ledger.epsilon(DELTA)

    # Execute
    predicted = ledger.epsilon_if(0.05, 0.8, 40, DELTA)
    ledger_unchanged = ledger.epsilon(DELTA)
    ledger.record(0.05, 0.8, 40)

    # Assert
    assert ledger_unchanged == before
    assert predicted == ledger.epsilon(DELTA)
    assert predicted > max(before, rdp_epsilon(0.05, 0.8, 40, DELTA))


def test_ledger_survives_json() -> None:
    # Prepare
    ledger = PrivacyLedger()
    ledger.record(0.02, 1.0, 50)
    ledger.record(0.05, 0.8, 40)

    # Execute
    restored = PrivacyLedger.from_json(ledger.to_json())

    # Assert
    assert restored.rounds == ledger.rounds
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"version": 2, "rounds": []}',
        '{"version": 1}',
        '{"version": 1, "rounds": [[0.1, 1.0]]}',
        '{"version": 1, "rounds": [[0.1, 1.0, 2.5]]}',
        '{"version": 1, "rounds": [[0.0, 1.0, 3]]}',
    ],
)
def test_damaged_ledger_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        PrivacyLedger.from_json(text)


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(0.0, 1.0, 1), (1.1, 1.0, 1), (0.1, -1.0, 1), (0.1, 1.0, 0)]
)
def test_invalid_rounds_are_refused(q: float, sigma: float, steps: int) -> None:
    with pytest.raises(ConfigError):
        PrivacyLedger().record(q, sigma, steps)


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_invalid_delta_is_refused(delta: float) -> None:
    with pytest.raises(ConfigError):
        rdp_epsilon(0.1, 1.0, 1, delta)


@pytest.mark.parametrize(
    "history",
    [
        [(0.037, 1.0, 20)] * 10,  # the demo's task: q = 32/864, 20 steps a round
        [(256 / 60000, 1.1, 14063)],
        [(0.01, 1.2, 100), (0.05, 0.8, 40), (0.01, 1.2, 7)],
        [(1.0, 2.0, 3)],  # full batch
        [(0.1, 0.0, 1)],  # no noise
    ],
)
def test_the_cached_accountant_equals_dp_accountings_own(
    history: list[tuple[float, float, int]],
) -> None:
    # Prepare: the library's own accountant, composing the same events from scratch
    accountant = RdpAccountant()
    for q, sigma, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    ledger = PrivacyLedger()

    # Execute
    for q, sigma, steps in history:
        ledger.record(q, sigma, steps)

    # Assert
    expected = accountant.get_epsilon(DELTA)
    if math.isinf(expected):
        assert math.isinf(ledger.epsilon(DELTA))
    else:
        assert ledger.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)


def test_rounds_within_budget_is_the_last_round_that_fits() -> None:
    q, sigma, steps, budget = 32 / 864, 1.0, 20, 8.0

    allowed = rounds_within_budget(q, sigma, steps, DELTA, budget)

    assert task_epsilon(q, sigma, steps, allowed, DELTA) <= budget
    assert task_epsilon(q, sigma, steps, allowed + 1, DELTA) > budget
    assert rounds_within_budget(q, 0.0, steps, DELTA, budget) == 0  # no noise, no round


def test_the_pld_accountant_is_tighter_than_rdp_for_the_demos_task() -> None:
    # The demo's ten rounds: q = 32 / 864, sigma 1, 20 steps a round, delta 1e-5
    q, steps = 32 / 864, 200
    rdp = rdp_epsilon(q, 1.0, steps, 1e-5)
    pld = pld_epsilon(q, 1.0, steps, 1e-5)

    assert 3.97 < rdp < 3.98
    assert 3.4 < pld < rdp  # PLD is tight; RDP's conversion costs ~12 % here


def test_the_ledger_is_saved_0600_whatever_the_umask(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger()
    ledger.record(0.02, 1.0, 50)
    path = tmp_path / "privacy-ledger.json"
    previous = os.umask(0o000)

    # Execute
    try:
        ledger.save(path)
    finally:
        os.umask(previous)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PrivacyLedger.load(path).rounds == ledger.rounds
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_ledger_others_can_read_is_tightened_on_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a ledger an older truscl wrote with the default 0644
    ledger = PrivacyLedger()
    ledger.record(0.02, 1.0, 50)
    path = tmp_path / "privacy-ledger.json"
    path.write_text(ledger.to_json())
    path.chmod(0o644)

    # Execute
    loaded = PrivacyLedger.load(path)

    # Assert: the charges are kept (refusing could end in a deleted ledger, a reset budget)
    assert loaded.rounds == ledger.rounds
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "tightened to 0600" in caplog.text


def test_a_symlinked_or_missing_ledger_is_refused_with_one_line(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    PrivacyLedger().save(target)
    link = tmp_path / "privacy-ledger.json"
    link.symlink_to(target)

    with pytest.raises(ConfigError, match="is a symlink"):
        PrivacyLedger.load(link)
    with pytest.raises(ConfigError, match="cannot open privacy ledger"):
        PrivacyLedger.load(tmp_path / "absent.json")


def test_the_demos_task_under_each_accountant_and_relation() -> None:
    # q = 32/864, sigma = 1.0, 10 rounds of 20 steps, delta = 1e-5: RDP is the device's
    # conservative figure, PLD the tight one, replace-one the stronger neighbouring relation
    q, sigma, steps = 32 / 864, 1.0, 200

    rdp = rdp_epsilon(q, sigma, steps, DELTA)
    pld = pld_epsilon(q, sigma, steps, DELTA)
    replace_one = pld_epsilon(q, sigma, steps, DELTA, replace_one=True)

    assert rdp == pytest.approx(3.976, abs=1e-3)
    assert pld == pytest.approx(3.487, abs=1e-3)
    assert replace_one == pytest.approx(5.079, abs=1e-3)
    assert pld < rdp < replace_one
