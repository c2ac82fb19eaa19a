"""``python -m bench.peers --quick``: Flower's deployment engine and truscl's demo on the same
task in one run, each with its seconds, update size and accuracy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None,
    reason="flwr is not installed: the peer needs the bench extra (pip install -e '.[bench]')",
)
def test_quick_run_measures_flower_beside_truscl(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "peers.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip

    # Assert: both ran, on the quick run's 2 clients and 2 rounds, Flower first
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert "peers_not_run" not in figures, figures.get("peers_not_run")
    peers = figures["peers"]
    assert (peers["clients"], peers["rounds"]) == (2, 2)
    assert isinstance(peers["how"], str) and "interleaved" in peers["how"]
    flower, truscl = peers["flower"], peers["truscl"]
    assert flower["what"].startswith("flwr ") and truscl["what"] == "truscl demo"
    for run in (flower, truscl):
        assert len(run["seconds"]) == 1 and run["seconds"][0] > 0
        assert [len(rounds) for rounds in run["round_s"]] == [2]
        assert all(s > 0 for s in run["round_s"][0])
        assert sum(run["round_s"][0]) < run["seconds"][0]
        # The global model was scored on the demo's test set and learned something
        assert 0.5 < run["accuracy"] <= 1.0
    # Flower sends its 5 float64 parameters in the clear, framed; truscl a signed ciphertext
    assert 5 * 8 <= flower["parameter_bytes"] < flower["update_bytes"]
    assert truscl["update_bytes"] > 10 * flower["update_bytes"]
    # The medians the table shows
    assert figures["flower_round_s"] > 0 and figures["truscl_demo_round_s"] > 0
    assert figures["flower_update_bytes"] == flower["update_bytes"]
    assert figures["truscl_update_bytes"] == truscl["update_bytes"]
    table = result.stdout.splitlines()
    for key in ("flower_round_s", "truscl_demo_round_s"):
        assert any(line.startswith(key + " ") for line in table), key
