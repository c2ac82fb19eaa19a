"""Training windows: a device trains on what it has once it holds the task's min_readings, is
charged at that round's actual sampling rate (also when a restart rebuilds the round), and
refuses a task needing a sensor it does not have. A real broker, the in-process EVM, a real
aggregator and owner, as in test_agent_resume."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness import synthetic_readings
from test_agent_resume import one_device_task, phase, wait_until

from truscl.agent.outbox import Outbox
from truscl.agent.rounds import Phase, RoundBook, RoundState, Terms, Train
from truscl.agent.sensors import Reading
from truscl.privacy.accounting import PrivacyLedger, SpentRound
from truscl.privacy.ckks import OwnerKeys
from truscl.server.archive import Archive
from truscl.wire.model import model_hash

MIN_READINGS = 80  # of a window of 128, at an expected batch of 16


class Feed:
    """The readings a test hands the agent: what it has sensed since it last asked."""

    def __init__(self, readings: list[Reading] | None = None) -> None:
        self._new = list(readings or [])
        self._lock = threading.Lock()

    def add(self, readings: list[Reading]) -> None:
        with self._lock:
            self._new += readings

    def __call__(self) -> list[Reading]:
        with self._lock:
            taken, self._new = self._new, []
        return taken


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


def ledger_of(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger.from_json((tmp_path / "device" / "privacy-ledger.json").read_text())


def samples_of(tmp_path: Path, update_id: str) -> int:
    _, update = Archive(tmp_path / "archive").update(update_id)
    return update.samples


@pytest.mark.slow
def test_a_device_trains_once_it_has_min_readings_and_is_charged_at_that_rate(
    tmp_path: Path, owner_keys: OwnerKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="truscl.agent.device")
    sensed = synthetic_readings(100, seed=11)
    feed = Feed(sensed[:50])
    with one_device_task(tmp_path, owner_keys, min_readings=MIN_READINGS) as task:
        aggregator = task.aggregator().start()
        agent = task.agent(collect=feed).start()
        try:
            # Execute: 50 readings are not enough; 50 more make 100
            wait_until(lambda: logged(caplog, "50 readings, round 1 needs 80") > 0, "a wait")
            waiting = phase(agent, 1)
            feed.add(sensed[50:])
            wait_until(lambda: phase(agent, 1) == Phase.INCLUDED, "round 1 included")
            (state,) = agent.rounds()
            spent = agent.epsilon()
        finally:
            agent.stop()
            aggregator.stop()
        (accepted,) = task.accepted(1)
        dp = task.spec.dp
    # Assert: uncharged while it waited; then trained on all 100, charged at 16/100, not at
    # the task's worst case 16/80 nor at a full window's 16/128
    assert waiting == Phase.ANNOUNCED
    assert ledger_of(tmp_path).rounds == (SpentRound(16 / 100, dp.noise_multiplier, 20),)
    assert state.readings == 100 and samples_of(tmp_path, accepted) == 100
    assert spent == ledger_of(tmp_path).epsilon(dp.delta)


@pytest.mark.slow
@pytest.mark.parametrize("ledger_written", [False, True], ids=["before-ledger", "after-ledger"])
def test_a_round_rebuilt_after_a_restart_trains_and_is_charged_at_its_first_rate(
    tmp_path: Path, owner_keys: OwnerKeys, ledger_written: bool
) -> None:
    with one_device_task(tmp_path, owner_keys, min_readings=MIN_READINGS) as task:
        # Prepare: killed after charging round 1 for 100 readings; the restarted device has
        # a full window of 128 by now
        dp = task.spec.dp
        (tmp_path / "device").mkdir()
        state = Outbox(tmp_path / "device" / "outbox.sqlite")
        model = model_hash(np.zeros(task.spec.n_params))
        state.save([RoundState(1, Phase.CHARGED, time.time() + 600, model, 0, readings=100)])
        state.close()
        if ledger_written:
            ledger = PrivacyLedger()
            ledger.record(16 / 100, dp.noise_multiplier, dp.local_steps)
            (tmp_path / "device" / "privacy-ledger.json").write_text(ledger.to_json())
        aggregator = task.aggregator().start()
        # Execute
        agent = task.agent(collect=Feed(synthetic_readings(128, seed=12))).start()
        try:
            wait_until(lambda: phase(agent, 1) == Phase.INCLUDED, "round 1 included")
        finally:
            agent.stop()
            aggregator.stop()
        (accepted,) = task.accepted(1)
    # Assert: one charge, at the rate of 100 readings, and the update trained on the newest 100
    assert ledger_of(tmp_path).rounds == (SpentRound(16 / 100, dp.noise_multiplier, 20),)
    assert samples_of(tmp_path, accepted) == 100


@pytest.mark.slow
def test_a_device_without_a_sensor_the_task_needs_refuses_it(
    tmp_path: Path, owner_keys: OwnerKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="truscl.agent.device")
    with one_device_task(tmp_path, owner_keys) as task:
        # Prepare: the task's features include co2_ppm; this device has no CO2 sensor
        assert "co2_ppm" in task.spec.features
        task.announce(deadline=time.time() + 600)
        # Execute
        agent = task.agent(sensors={"bme280", "light", "pir"}).start()
        try:
            wait_until(lambda: logged(caplog, "refusing task") > 0, "the refusal")
            rounds = agent.rounds()
        finally:
            agent.stop()
    # Assert: one clear error naming the feature and the sensor; nothing charged
    (error,) = [r for r in caplog.records if "refusing task" in r.getMessage()]
    assert error.levelno == logging.ERROR
    assert "feature 'co2_ppm' needs the co2 sensor" in error.getMessage()
    assert "it has bme280, light, pir" in error.getMessage()
    assert all(s.phase == Phase.ANNOUNCED for s in rounds)
    assert not (tmp_path / "device" / "privacy-ledger.json").exists()


def test_a_state_file_from_before_windows_reads_its_charges_as_full_windows(
    tmp_path: Path,
) -> None:
    # Prepare: the rounds table as it was, with round 3 charged
    path = tmp_path / "outbox.sqlite"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE rounds (round INTEGER PRIMARY KEY, phase TEXT NOT NULL, deadline REAL"
            " NOT NULL, model_hash BLOB NOT NULL, ledger_index INTEGER, update_id BLOB, record"
            " BLOB, reason TEXT NOT NULL, counted_in INTEGER NOT NULL, anchor_tx TEXT NOT NULL)"
        )
        old.execute(
            "INSERT INTO rounds VALUES (3, 'charged', 100.0, ?, 2, NULL, NULL, '', 0, '')",
            (b"\x01" * 32,),
        )
    # Execute
    outbox = Outbox(path)
    (state,) = outbox.rounds()
    outbox.save([RoundState(4, Phase.CHARGED, 200.0, b"\x02" * 32, 3, readings=70)])
    states = outbox.rounds()
    outbox.close()
    # Assert: the old charge has no count (the agent takes it as a full window); new rows do
    assert (state.round, state.ledger_index, state.readings) == (3, 2, None)
    assert [s.readings for s in states] == [None, 70]
    book = RoundBook([states[1]])
    assert book.tick(0.0, Terms(10, True)).decisions == [
        Train(4, b"\x02" * 32, charge=False, readings=70)
    ]
