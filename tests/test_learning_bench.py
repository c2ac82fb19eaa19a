"""The learning benchmark in its quick form (bench/learning.py --quick): every optimiser runs
on both tasks with the devices' and the owner's own code, and reports figures of the right
shape. Its 95 % target is the full benchmark's to check, not this test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_a_quick_learning_bench_reports_every_optimiser_on_both_tasks(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "learning.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learning.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    # Assert
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    seeds, optimisers = figures["seeds"], figures["optimisers"]
    assert set(optimisers) == {"fedavg", "fedavgm", "fedadam"}
    for task in ("default", "hard"):
        rounds = figures["tasks"][task]["rounds"]
        assert 0 < figures["tasks"][task]["epsilon"] <= 8
        for results in optimisers.values():
            row = results[task]
            assert [len(accuracy) for accuracy in row["accuracy"]] == [rounds] * len(seeds)
            assert row["final_accuracy"] == [accuracy[-1] for accuracy in row["accuracy"]]
            # better than a coin, no better than certainty: a model that learned something
            assert all(0.5 < a <= 1 for accuracy in row["accuracy"] for a in accuracy)
            assert all(0.5 < c <= 1 for c in row["centralised_accuracy"])
            assert row["worst_ratio"] == min(row["ratio"])
    assert "light_lux" not in figures["tasks"]["hard"]["features"]
    best = figures["hard_task_best_ratio"]
    assert best == max(results["hard"]["worst_ratio"] for results in optimisers.values())
    assert best == optimisers[figures["hard_task_best_optimiser"]]["hard"]["worst_ratio"]
    assert "hard task: best optimiser" in run.stdout
