"""The device's process loads what it uses and nothing of the server roles (issue 9)."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

from device_only import SERVER_ONLY, TRUSCL_ON_A_DEVICE

ROOT = Path(__file__).resolve().parents[1]


def test_the_agent_service_and_status_import_no_server_package() -> None:
    # Execute: the modules `truscl agent run|status|provision` load, in a fresh interpreter
    program = (
        "import json, sys\n"
        "import truscl.cli, truscl.agent.service, truscl.agent.status, truscl.chain.deployment\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, check=True
        ).stdout
    )

    # Assert
    assert "truscl.agent.device" in loaded and "truscl.chain.reader" in loaded
    server = [m for m in loaded if m.partition(".")[0] in SERVER_ONLY]
    assert server == []
    assert "truscl.chain.client" not in loaded


def test_truscl_agent_runs_without_the_server_packages(tmp_path: Path) -> None:
    # A corrupted configuration: the command gets as far as reading it, every import done
    config = tmp_path / "agent.toml"
    config.write_text('task = "0x12"\n')

    result = subprocess.run(
        [*TRUSCL_ON_A_DEVICE, "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.stderr.strip() == f"truscl: {config}: task must be 0x and 64 hex digits"
    assert result.returncode == 1


def test_the_device_extra_needs_no_server_package() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    device = {
        line.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
        for line in setup["options.extras_require"]["device"].splitlines()
        if line.strip()
    }
    assert device, "no device extra: the test would pass vacuously"
    assert device.isdisjoint({"web3", "dp-accounting", "eth-tester", "py-evm", "scipy"})
