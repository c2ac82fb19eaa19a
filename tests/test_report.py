"""``truscl report``: plots and a summary from a demo's chain, journal, archive and models."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FleetRun

from truscl.report import PLOTS, DeviceFigures, RoundFigures, TaskFigures, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def assert_plots(folder: Path) -> None:
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG), name
        assert len(data) > 5_000, f"{name} is {len(data)} bytes: an empty canvas?"


def table_rows(summary: str) -> dict[int, list[str]]:
    """The round table's rows by round number, cells stripped."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdecimal():
            rows[int(cells[0])] = cells
    return rows


@pytest.mark.slow
def test_the_demo_writes_a_report_and_prints_its_path(fleet_run: FleetRun) -> None:
    # Assert: the path printed is the report's, beside its plots, and its figures are the run's
    (printed,) = re.findall(r"^report: (.+)$", fleet_run.stdout, re.MULTILINE)
    summary = Path(printed)
    assert summary == fleet_run.workdir / "report" / "summary.md"
    assert_plots(summary.parent)
    text = summary.read_text()
    assert "- rounds: 2 of 2 (2 anchored)" in text
    assert "- devices seen: 2" in text and "- updates counted: 4" in text
    rows = table_rows(text)
    assert sorted(rows) == [1, 2]
    for row in fleet_run.summary["rounds"]:
        cells = rows[row["round"]]
        assert cells[1] == "delivered" and cells[2] == str(row["participants"]) == "2"
        assert cells[5] == f"{row['bytes']:,}"
        assert int(cells[6]) > 21_000  # gas: more than a bare transfer
        assert float(cells[7]) == pytest.approx(row["accuracy"], abs=1e-3)
        assert cells[8] == f"`{row['anchor_tx']}`"
    for name in PLOTS:
        assert f"]({name})" in text


@pytest.mark.slow
def test_truscl_report_reads_the_services_configurations(
    fleet_run: FleetRun, tmp_path: Path
) -> None:
    # Execute: the command an operator runs, with and without an evaluation set
    work = fleet_run.workdir
    base = [sys.executable, "-m", "truscl.cli", "report", "--task", fleet_run.task,
            "--aggregator", str(work / "aggregator" / "aggregator.toml")]  # fmt: skip
    full = subprocess.run(
        [*base, "--out", str(tmp_path / "full"), "--owner", str(work / "owner" / "owner.toml"),
         "--test-set", str(work / "test-set.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    bare = subprocess.run(
        [*base, "--out", str(tmp_path / "bare")], capture_output=True, text=True, timeout=300
    )
    # Assert: the same figures as the demo's own report; without a test set, it says so
    assert full.returncode == 0, full.stderr
    assert full.stdout.strip() == str(tmp_path / "full" / "summary.md")
    assert_plots(tmp_path / "full")
    demo_rows = table_rows((work / "report" / "summary.md").read_text())
    assert table_rows((tmp_path / "full" / "summary.md").read_text()) == demo_rows
    assert bare.returncode == 0, bare.stderr
    assert_plots(tmp_path / "bare")
    text = (tmp_path / "bare" / "summary.md").read_text()
    assert "- accuracy: not available" in text
    assert all(cells[7] == "n/a" for cells in table_rows(text).values())


def test_a_report_shows_rejections_late_updates_and_refusals(tmp_path: Path) -> None:
    # Prepare: figures as a troubled task would have them
    figures = TaskFigures(
        task="0x" + "ab" * 32,
        rounds_planned=3,
        rounds=(
            RoundFigures(
                1,
                "delivered",
                3,
                bytes=300,
                rejections={"bad-signature": 2},
                anchor_tx="0x" + "01" * 32,
                gas=100_000,
                refused=2,
            ),
            RoundFigures(2, "open", 1, late=1, bytes=150, rejections={"duplicate": 1}),
        ),
        devices=(DeviceFigures("0x" + "cd" * 20, 2, 2, 1.5, ((1, 1.0), (2, 1.5))),),
        rejections={"bad-signature": 2, "duplicate": 1, "malformed-message": 4},
        accuracy_note="not available: no evaluation set",
    )
    # Execute
    summary = write_report(figures, tmp_path / "out").read_text()
    # Assert
    assert_plots(tmp_path / "out")
    assert "- rounds: 2 of 3 (1 anchored)" in summary
    assert "- rejections: bad-signature 2, duplicate 1, malformed-message 4" in summary
    assert "- refused rounds: 1" in summary
    rows = table_rows(summary)
    assert rows[1][:5] == ["1", "delivered", "3", "0", "bad-signature 2"]
    assert rows[2][:6] == ["2", "open", "1", "1", "duplicate 1", "150"]
    assert rows[2][6] == "n/a" and rows[2][8] == "`-`"
