"""The aggregator benchmark runs end to end (``--quick``) and reports the issue's JSON keys;
its figures are read by people against the targets, not asserted here (a loaded machine is
slower, not wrong)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.aggregator import IN_PROCESS_RUNS, ISSUE_PARAMS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_benchmark_reports_throughput_and_memory_by_device_count(
    tmp_path: Path,
) -> None:
    out = tmp_path / "aggregator.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "aggregator.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["aggregator_updates_per_s"] > 0
    # the issue's update size: 10,000 parameters at least, three ciphertexts at ckks-4096
    assert figures["params"] >= ISSUE_PARAMS and figures["ciphertexts_per_update"] == 3
    runs = figures["sharded"]["runs_updates_per_s"]  # the figure is their median
    assert len(runs) == IN_PROCESS_RUNS == len(figures["in_process"]["runs_updates_per_s"])
    assert figures["aggregator_updates_per_s"] == sorted(runs)[len(runs) // 2]
    sharded = figures["sharded"]  # one task's updates, shared by the shards between them
    assert sharded["updates"] == figures["in_process"]["updates"] and sharded["processes"] == 2
    assert set(figures["aggregator_rss_mb"]) == {"10", "100"}
    assert figures["service"]["100"]["updates"] == 100
    parallel = figures["in_processes"]  # every process fed all its updates
    assert parallel["updates"] == parallel["processes"] * figures["in_process"]["updates"]
    assert "floor (deserialise + add)" in run.stdout
    # the machine's ceiling through the broker: its cores over the CPU one more update costs
    path = figures["service_path_cpu_ms_per_update"]
    assert path["broker"] > 0 and path["devices"] > 0 and path["aggregator"] > 0
    assert path["total"] == pytest.approx(path["aggregator"] + path["broker"] + path["devices"])
    assert figures["service_cores_allow_per_s"] == pytest.approx(
        figures["cores"] * 1e3 / path["total"], rel=1e-3
    )
