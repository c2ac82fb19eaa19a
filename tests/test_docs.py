"""The docs' commands work: docs/tutorial.md's shell blocks run in order, as a reader types them
(a chain, a TLS broker, three simulated devices, the owner with a key guardian and the
aggregator as separate processes, two rounds, an audit); and every ``truscl`` command any page
of docs/ or the README names exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from truscl.broker import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TRUSCL = str(Path(sys.executable).with_name("truscl"))
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)


def shell_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_tutorial_has_the_steps_it_promises() -> None:
    script = "\n".join(shell_blocks(ROOT / "docs" / "tutorial.md"))
    for command in (
        "anvil",
        "truscl agent provision",
        "truscl broker provision",
        "mosquitto -c",
        "truscl chain deploy",
        "truscl chain register",
        "truscl guardian init",
        "truscl owner init",
        "truscl audit",
    ):
        assert command in script, command


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_command_a_page_names_exists(page: Path) -> None:
    """``truscl GROUP [ACTION] --help`` succeeds for every command the page writes as code."""
    code = "\n".join(re.findall(r"`([^`\n]+)`", page.read_text()) + shell_blocks(page))
    groups = _groups()
    named = {tuple(m.group(1).split()) for m in re.finditer(r"\btruscl((?: [a-z-]+){1,2})", code)}
    for words in sorted(named):
        if words[0] not in groups:
            continue  # not a command group: prose such as `truscl is`
        command = words[:2] if groups[words[0]] else words[:1]
        assert len(command) == 1 or command[1] in groups[words[0]], f"{page.name}: {words}"
        result = subprocess.run(
            [TRUSCL, *command, "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{page.name}: truscl {' '.join(command)}: {result.stderr}"


def _groups() -> dict[str, set[str]]:
    """Each command group and its actions, from ``truscl --help`` and each group's help."""
    import argparse

    from truscl.cli import GROUPS

    parser = argparse.ArgumentParser(prog="truscl")
    commands = parser.add_subparsers(dest="command")
    for group in GROUPS:
        group.register(commands)
    found: dict[str, set[str]] = {}
    for name, sub in commands.choices.items():
        actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        found[name] = set(actions[0].choices) if actions else set()
    return found


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    script = "\n".join(shell_blocks(ROOT / "docs" / "tutorial.md"))
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={  # the reader's environment: the tools on PATH, two free ports, an empty folder
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin:/sbin",
            "FLEET": str(fleet),
            "CHAIN_PORT": str(free_port()),
            "BROKER_PORT": str(free_port()),
        },
    )
    logs = "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-8:])
        for log in sorted(fleet.glob("*.log"))
    )
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{logs}"
    out = result.stdout
    assert "audit: 2/2 rounds verified" in out, out
    assert "keygen: verified, the task's key was made by guardian-1, owner" in out
    assert "registered on chain: yes" in out
    assert "decrypted rounds [1, 2]" in out and "refused   none" in out
    assert "threshold (guardian-1, owner)" in out
