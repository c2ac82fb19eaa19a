"""The demo and ``truscl audit`` against a real node (anvil), as an operator would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from truscl.server.archive import Archive

pytestmark = pytest.mark.slow


def truscl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "truscl.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_truscl_audit_verifies_a_run_and_catches_a_cheating_archive(
    anvil: str, tmp_path: Path
) -> None:
    # Prepare: a short demo on the node, its archive kept
    workdir, summary_file = tmp_path / "run", tmp_path / "summary.json"
    demo = truscl(
        "demo", "--rpc", anvil, "--devices", "3", "--rounds", "2",
        "--workdir", str(workdir), "--json", str(summary_file),
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    audit_args = (
        "audit", "--rpc", anvil, "--contract", summary["contract"],
        "--task", summary["task"], "--archive", str(workdir / "aggregator" / "archive"),
    )  # fmt: skip
    archive = Archive(workdir / "aggregator" / "archive")
    manifest_path = workdir / "aggregator" / "archive" / "rounds" / summary["task"] / "1.json"
    honest_manifest = manifest_path.read_text()

    # Execute and assert: the honest archive verifies
    honest = truscl(*audit_args)
    assert honest.returncode == 0, honest.stdout + honest.stderr
    assert "audit: 2/2 rounds verified" in honest.stdout

    # An aggregator that quietly drops an accepted update is caught by the anchored root
    manifest = json.loads(honest_manifest)
    manifest["updates"] = manifest["updates"][1:]
    manifest_path.write_text(json.dumps(manifest))
    dropped = truscl(*audit_args)
    assert dropped.returncode == 1
    assert "round   1" in dropped.stdout and "differs from the anchored root" in dropped.stdout
    assert "audit: 1/2 rounds verified" in dropped.stdout

    # An archived update whose bytes were changed no longer matches its content address
    manifest_path.write_text(honest_manifest)
    victim = Path(archive.root / "blobs" / manifest["updates"][0])
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    altered = truscl(*audit_args)
    assert altered.returncode == 1
    assert "does not match its name" in altered.stdout

    # A deleted blob and a malformed manifest: one clear line each, no traceback, no errno,
    # no path the user did not give
    victim.unlink()
    manifest_2 = manifest_path.with_name("2.json")
    manifest_2.write_text("{")
    broken = truscl(*audit_args)
    assert broken.returncode == 1
    assert f"update {manifest['updates'][0][:12]}… is missing from the archive" in broken.stdout
    assert "the round's manifest is malformed: not JSON" in broken.stdout
    assert "Traceback" not in broken.stderr and "Errno" not in broken.stdout
    assert str(victim) not in broken.stdout + broken.stderr
