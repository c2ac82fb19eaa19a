"""The whole system end to end: ``truscl demo`` as README command 1 runs it (each role its own
process, on anvil and a real broker), and the in-process variant (every role a thread)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from truscl.demo import DemoConfig, run_demo
from truscl.demo.fleet import DEVICE_PROCESSES, _device_processes
from truscl.demo.inprocess import run_in_process
from truscl.errors import ConfigError
from truscl.task import DpTerms, TaskSpec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


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
        # the tight accountant spends less than RDP on the same events, and replacing a
        # reading costs more than adding or removing one (not always more than RDP's figure)
        assert row["epsilon_pld"] < row["epsilon"]
        assert row["epsilon_pld"] < row["epsilon_replace_one"]
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
    # Prepare: deadlines on a clock that moves only once a round has the two updates the
    # remaining devices send; until a device is gone, a round closes when all are in.
    config = DemoConfig(
        devices=3,
        rounds=3,
        drop_device_at=2,
        round_seconds=3600.0,
        workdir=tmp_path,
        in_process=True,
    )
    now = [1_000.0]

    def deadline_passes_once_two_are_in(round_no: int, participants: int) -> None:
        if round_no >= config.drop_device_at and participants == 2:
            now[0] += config.round_seconds + 1

    # Execute
    summary = run_in_process(
        config, io.StringIO(), clock=lambda: now[0], on_accepted=deadline_passes_once_two_are_in
    )
    # Assert
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


def test_a_task_its_devices_budget_cannot_pay_for_is_refused_before_it_starts(
    tmp_path: Path,
) -> None:
    # Prepare: a budget that admits two rounds of DP-SGD but not three
    config = DemoConfig(
        devices=2,
        rounds=3,
        workdir=tmp_path,
        dp=DpTerms(epsilon_budget=2.5),
        in_process=True,
    )
    # Execute / Assert: refused with the figures, before any device spent anything
    with pytest.raises(ConfigError, match=r"3 rounds would spend epsilon 2\.6\d+ .* at most 2"):
        run_demo(config, out=io.StringIO())
    ledgers = list(tmp_path.glob("devices/*/privacy-ledger.json"))
    assert ledgers == []


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


@pytest.mark.parametrize(("devices", "alone_last"), [(1, False), (5, True), (8, False), (50, True)])
def test_devices_share_processes_only_beyond_eight(devices: int, alone_last: bool) -> None:
    groups = _device_processes(devices, alone_last)

    assert sorted(i for group in groups for i in group) == list(range(devices))
    assert len(groups) == min(devices, DEVICE_PROCESSES)
    assert max(map(len, groups)) - min(map(len, groups[:-1] or groups)) <= 1
    if alone_last:
        assert groups[-1] == [devices - 1]


def _demo_with_task(tmp_path: Path, task: str, *options: str) -> tuple[dict, str]:
    out = tmp_path / "summary.json"
    task_file = ROOT / "deploy" / "tasks" / task
    result = subprocess.run(
        [sys.executable, "-m", "truscl.cli", "demo", "--task", str(task_file),
         "--devices", "2", "--rounds", "2", "--json", str(out), "--workdir", str(tmp_path / "run"),
         *options],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_truscl_demo_runs_a_task_of_three_features(tmp_path: Path) -> None:
    # Execute: every role a thread, on the in-process EVM, to keep CI time down
    summary, stdout = _demo_with_task(tmp_path, "three-features.toml", "--in-process")
    # Assert: the updates carry the 3 + 1 parameters of the task's model; the task audits
    spec = TaskSpec.decode((tmp_path / "run" / "devices" / "0" / "spec.cbor").read_bytes())
    assert spec.features == ("light_lux", "co2_ppm", "humidity_ratio") and spec.n_params == 4
    assert [row["participants"] for row in summary["rounds"]] == [2, 2]
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 2
    assert 0.5 < summary["final_accuracy"] and 0.5 < summary["baseline_accuracy"]
    assert "audit: 2/2" in stdout


def test_truscl_demo_runs_an_mlp_task_with_a_process_per_role(tmp_path: Path) -> None:
    # Execute
    summary, stdout = _demo_with_task(tmp_path, "mlp.toml")
    # Assert: the owner's released models are the MLP's 97 parameters, and they learnt
    spec = TaskSpec.decode((tmp_path / "run" / "owner" / "state" / "spec.cbor").read_bytes())
    models = sorted((tmp_path / "run" / "owner" / "state" / "models").glob("*.model"))
    assert (spec.model, spec.hidden, spec.n_params) == ("mlp", (8, 4), 97)
    assert [path.stat().st_size for path in models] == [8 * 97] * 3  # models 0, 1 and 2
    assert [row["participants"] for row in summary["rounds"]] == [2, 2]
    assert summary["audit"]["verified"] == summary["audit"]["total"] == 2
    assert summary["stopped_cleanly"] is True and "audit: 2/2" in stdout
