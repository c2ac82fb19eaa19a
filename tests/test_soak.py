"""The soak benchmark in its quick form (bench/soak.py --quick): a fleet of several device
processes through every kind of fault, with nothing lost, nothing counted twice and every round
audited. Its latencies are printed, never asserted: a loaded CI machine says nothing by them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from truscl.chain.anvil import find_anvil
from truscl.errors import ConfigError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "aggregator-kill",
    "aggregator-down",
    "broker-restart",
    "chain-gate",
    "owner-restart",
    "device-kill",
    "forged-receipts",
}


def test_a_quick_soak_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    try:
        find_anvil()
    except ConfigError:
        pytest.skip("anvil is not installed: run `npm ci` in contracts/ (scripts/test does)")
    out = tmp_path / "soak.json"
    # its own folder (mode 0755, as the soak makes it): run as root, mosquitto persists as the
    # mosquitto user, which cannot reach into pytest's 0700 tmp_path
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["failure"] == "", figures["failure"]
    assert figures["lost"] == 0, figures["lost_updates"]
    assert figures["double_counted"] == 0, figures["double_counted_updates"]
    assert figures["sent"] >= figures["devices"] * figures["rounds"]
    assert figures["accepted"] == figures["sent"]
    audit = figures["audit"]
    assert audit["verified"] == audit["total"] == figures["rounds"], audit
    faults = {f["kind"]: f for f in figures["faults"]}
    assert set(faults) == KINDS
    assert all(f["injected"] and f["recovered"] for f in faults.values()), faults
    killed = faults["device-kill"]
    assert killed["killed_awaiting_receipt"] >= 1
    assert killed["awaiting_counted_as_sent"] == killed["killed_awaiting_receipt"]
    forged = faults["forged-receipts"]
    assert forged["forged"] >= 1 and forged["refused"] >= forged["forged"]
    assert forged["state_unchanged"]
    assert faults["chain-gate"]["anchored_while_away"] is False
    assert faults["owner-restart"]["released_while_down"] is False
    assert len(figures["aggregator_rss_mb"]) >= 2
    assert run.returncode == 0, run.stdout[-3000:]
