"""The systemd units: each runs its role as a notify service under a watchdog, and passes
scripts/check-units (`systemd-analyze verify` silent, `security` exposure at most 2.5), a
checker that is itself shown to catch a misspelt directive and a weakly hardened unit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
ROLES = ("agent", "aggregator", "owner", "guardian")


def settings(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment of a unit file, repeated keys included."""
    found, section = [], ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(unit: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in settings(unit) if (s, k) == (section, key)]


def check_units(units: Path = UNITS) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    environment = {
        **os.environ,
        "UNITS": str(units),
        "TRUSCL": str(Path(sys.executable).with_name("truscl")),
    }
    return subprocess.run(
        [str(ROOT / "scripts" / "check-units")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_there_is_a_unit_for_each_role() -> None:
    assert {f"truscl-{role}.service" for role in ROLES} <= {p.name for p in UNITS.glob("*")}


@pytest.mark.parametrize("role", ROLES)
def test_each_unit_runs_its_role_as_a_notify_service_under_a_watchdog(role: str) -> None:
    unit = UNITS / f"truscl-{role}.service"

    assert values(unit, "Service", "ExecStart") == [
        f"/opt/truscl/.venv/bin/truscl --log-level INFO {role} run --config /etc/truscl/{role}.toml"
    ]
    assert values(unit, "Service", "Type") == ["notify"]
    assert values(unit, "Service", "NotifyAccess") == ["main"]
    assert values(unit, "Service", "WatchdogSec") == ["30"]
    assert values(unit, "Service", "Restart") == ["on-failure"]
    assert values(unit, "Service", "TimeoutStopSec") == ["30"]
    state = "truscl" if role == "agent" else f"truscl-{role}"
    assert values(unit, "Service", "StateDirectory") == [state]
    assert values(unit, "Service", "StateDirectoryMode") == ["0700"]


def test_only_the_agent_reaches_devices_and_only_its_sensors() -> None:
    agent = UNITS / "truscl-agent.service"
    assert values(agent, "Service", "DevicePolicy") == ["closed"]
    assert values(agent, "Service", "DeviceAllow") == [
        f"{node} rw"
        for node in (
            "/dev/i2c-1",
            "/dev/spidev0.0",
            "/dev/spidev0.1",
            "/dev/gpiochip0",
            "/dev/gpiochip4",
            "/dev/gpiomem",
        )
    ]
    for role in ("aggregator", "owner", "guardian"):
        server = UNITS / f"truscl-{role}.service"
        assert values(server, "Service", "PrivateDevices") == ["yes"]
        assert values(server, "Service", "DeviceAllow") == []
        assert values(server, "Service", "User") == [f"truscl-{role}"]


def test_every_unit_is_valid_and_exposed_at_most_2_5() -> None:
    result = check_units()

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    exposures = dict(
        re.findall(r"^(\S+\.service): verify clean, exposure ([0-9.]+)", result.stdout, re.M)
    )
    assert sorted(exposures) == sorted(p.name for p in UNITS.glob("*.service"))
    assert all(float(exposure) <= 2.5 for exposure in exposures.values()), exposures


def test_the_check_fails_on_a_misspelt_directive(tmp_path: Path) -> None:
    unit = (UNITS / "truscl-owner.service").read_text()
    assert "\nWatchdogSec=" in unit
    (tmp_path / "truscl-owner.service").write_text(
        unit.replace("\nWatchdogSec=", "\nWatchdogSecs=")
    )

    result = check_units(tmp_path)

    assert result.returncode == 1
    assert "verify is not silent" in result.stderr and "WatchdogSecs" in result.stderr


def test_the_check_fails_on_a_weakly_hardened_unit(tmp_path: Path) -> None:
    (tmp_path / "bare.service").write_text(
        "[Unit]\nDescription=bare\n\n[Service]\n"
        "ExecStart=/opt/truscl/.venv/bin/truscl --help\nUser=nobody\n"
    )

    result = check_units(tmp_path)

    assert result.returncode == 1
    assert re.search(r"bare\.service: exposure [0-9.]+ is above 2\.5", result.stderr), result.stderr
