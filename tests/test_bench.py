"""``python -m bench --quick --json FILE``: every figure the issue names, under its key, typed.

Targets are not asserted (a loaded CI machine would fail them without anything being wrong);
the benchmarks set each figure beside its target and a baseline of the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import MODULES, REQUIRED_KEYS, TARGETS, Target, as_rows

ROOT = Path(__file__).resolve().parents[1]
PER_COUNT = ("aggregator_rss_mb", "round_latency_s", "gas_per_round")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


@pytest.mark.slow
def test_quick_run_writes_every_required_key(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=1500,
    )  # fmt: skip

    # Assert: the run worked and gave every key of the modules in the tree
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    present = {name for name in MODULES if (ROOT / "bench" / f"{name}.py").exists()}
    assert {"device", "round_latency"} <= present
    for name, why in figures["not_run"].items():
        assert name not in present and why == "no such module in bench/", (name, why)
    for key, module in REQUIRED_KEYS.items():
        if module not in present:
            assert key in figures["missing_keys"]
            continue
        value = figures[key]
        if key in PER_COUNT:
            assert value and all(count.isdigit() and _is_number(v) for count, v in value.items()), (
                key,
                value,
            )
        elif key == "bytes_per_param":  # by profile, then by update size
            assert value and all(
                by_size and all(_is_number(v) for v in by_size.values())
                for by_size in value.values()
            ), value
        else:
            assert _is_number(value) and value > 0, (key, value)
    assert "10" in figures["round_latency_s"] and figures["gas_per_round"]["10"] > 0
    assert figures["device_import_s"] > figures["device_import_baseline_s"]["python -c pass"]
    # One table, each target beside its figure
    for key in ("device_round_s", "device_import_s", "device_rss_mb"):
        line = next(row for row in result.stdout.splitlines() if row.startswith(key + " "))
        assert str(TARGETS[key]) in line and line.split()[-1] in ("yes", "NO")


def test_a_missing_module_is_reported_not_skipped() -> None:
    from bench.__main__ import run, table

    results, not_run = run(("no_such_benchmark",), quick=True)

    assert results == {}
    assert not_run == {"no_such_benchmark": "no such module in bench/"}
    assert "not run: no_such_benchmark (no such module in bench/)" in table(results, not_run)


def test_rows_and_targets() -> None:
    assert as_rows("x", 1.5) == [("x", 1.5)]
    assert as_rows("x", {"10": 2, "100": 3.0, "note": "n"}) == [("x[10]", 2.0), ("x[100]", 3.0)]
    assert as_rows("x", True) == [] and as_rows("x", "text") == []
    assert as_rows("x", {"a": {"1": 4}}) == [("x[a][1]", 4.0)]
    assert as_rows("x", {"a": {"b": {"c": 1}}}) == []
    assert Target(2.0, "s").met(2.0) and not Target(2.0, "s").met(2.1)
    assert Target(10.0, "/s", at_most=False).met(11.0)


def test_a_device_count_that_did_not_run_is_in_the_table() -> None:
    from bench.__main__ import table

    results = {
        "round_latency": {
            "round_latency_s": {"10": 2.5},
            "round_latency_not_run": {"100": "not finished within 1200 s"},
        }
    }

    lines = table(results, {}).splitlines()

    assert any(line.startswith("round_latency_s[10]") for line in lines)
    assert "not run: round_latency[100] (not finished within 1200 s)" in lines
