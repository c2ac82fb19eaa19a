"""The whole system end to end: ``truscl demo`` as README command 1 runs it (each role its own
process, on anvil and a real broker), and the in-process variant (every role a thread)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from truscl.demo import DemoConfig, DemoFailed, run_demo
from truscl.task import DpTerms

pytestmark = pytest.mark.slow


def test_truscl_demo_with_defaults_meets_the_targets(tmp_path: Path) -> None:
    # Execute: exactly what README command 1 runs, with --json
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "truscl.cli", "demo", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert len(summary["rounds"]) == 10
    for row in summary["rounds"]:
        assert set(row) >= {"round", "participants", "accuracy", "epsilon", "bytes", "anchor_tx"}
        assert row["participants"] == 5
        assert row["anchor_tx"].startswith("0x") and len(row["anchor_tx"]) == 66
        assert row["bytes"] > 0
    assert summary["final_accuracy"] >= 0.95 * summary["baseline_accuracy"]
    assert 0 < summary["epsilon"] <= 8
    assert summary["delta"] == 1e-5
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 10
    assert "round  10" in result.stdout and "audit: 10/10" in result.stdout
    assert summary["processes"] == 8 and summary["stopped_cleanly"] is True  # with a guardian
    assert summary["he_mode"] == "threshold" and summary["key_holders"] == ["guardian-1", "owner"]
    assert summary["refused_rounds"] == []
    assert 0 < summary["epsilon_pld"] < summary["epsilon"]  # the tight accountant, same events


def test_a_round_with_a_dropout_closes_at_quorum(tmp_path: Path) -> None:
    # The deadline only matters once a device is gone: until then a round closes when all are in.
    config = DemoConfig(
        devices=3, rounds=3, drop_device_at=2, round_seconds=10.0, workdir=tmp_path, in_process=True
    )

    summary = run_demo(config, out=io.StringIO())

    assert [r["participants"] for r in summary["rounds"]] == [3, 2, 2]
    assert summary["audit"] == {"verified": 3, "total": 3, "problems": {}}
    assert summary["he_mode"] == "threshold" and summary["refused_rounds"] == []


def test_the_single_key_mode_still_runs_for_small_trials(tmp_path: Path) -> None:
    config = DemoConfig(
        devices=2, rounds=1, workdir=tmp_path, in_process=True, he_mode="single-key"
    )

    summary = run_demo(config, out=io.StringIO())

    assert (summary["he_mode"], summary["key_holders"]) == ("single-key", [])
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 1


def test_devices_stop_when_their_budget_is_spent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a budget that admits two rounds of DP-SGD but not a third
    config = DemoConfig(
        devices=2,
        rounds=3,
        round_seconds=1.0,
        round_timeout=8.0,
        workdir=tmp_path,
        dp=DpTerms(epsilon_budget=2.5),
        in_process=True,
    )
    caplog.set_level(logging.WARNING, logger="truscl.agent.device")
    # Execute
    with pytest.raises(DemoFailed, match="round 3"):
        run_demo(config, out=io.StringIO())
    # Assert
    spent = [r for r in caplog.records if "privacy budget spent" in r.getMessage()]
    assert len(spent) == 2
    assert all("from round 3" in r.getMessage() for r in spent)


def test_a_small_message_limit_chunks_context_and_updates(tmp_path: Path) -> None:
    # 16 KiB messages: the 125 KB public context and each 66 KB update travel in chunks
    config = DemoConfig(
        devices=2, rounds=1, max_message=16 * 1024, workdir=tmp_path, in_process=True
    )

    summary = run_demo(config, out=io.StringIO())

    (row,) = summary["rounds"]
    assert row["participants"] == 2
    assert row["bytes"] > 2 * 65_000
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 1
