"""``truscl agent`` as separate processes, as systemd runs it, in a task on a real node."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import task_owner

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, NodeChain
from truscl.demo import occupancy_spec
from truscl.keyfile import load_or_create_account
from truscl.privacy.ckks import OwnerKeys
from truscl.server.aggregator import Aggregator, RoundStats
from truscl.server.archive import Archive
from truscl.server.audit import audit_task
from truscl.task import DpTerms

pytestmark = pytest.mark.slow
AGENT = [sys.executable, "-m", "truscl.cli", "--log-level", "INFO", "agent", "run"]

CONFIG = """
task = "{task}"
[device]
key = "{state}/device.key"
state = "{state}"
name = "device-{index}"
[broker]
host = "127.0.0.1"
port = {port}
[chain]
rpc = "{rpc}"
contract = "{contract}"
[sensors]
hardware = "simulated"
interval = 300
room = {index}
seed = 11
time_scale = 60000  # 300 simulated seconds every 5 ms
"""
# The second device trains through LiteRT and shows its prediction on an LED
LITERT = """
[training]
backend = "litert"
[output]
pin = 17
"""


def test_agents_in_their_own_processes_complete_a_task(
    anvil: str, tmp_path: Path, owner_keys: OwnerKeys
) -> None:
    # Prepare: chain, broker, owner and aggregator here; two agents as child processes
    chain = NodeChain(anvil)
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    aggregator_account = chain.new_account()
    closed: list[RoundStats] = []
    with Mosquitto(tmp_path / "broker") as broker:
        processes, states = [], []
        for index in range(2):
            state = tmp_path / f"device-{index}"
            contract.register_device(load_or_create_account(state / "device.key").address)
            states.append(state)
        owner = task_owner(chain, contract.address, owner_keys, broker)
        spec = occupancy_spec(
            owner.context_hash,
            rounds=2,
            quorum=2,
            window=128,
            dp=DpTerms(batch_size=16),
        )
        for index, state in enumerate(states):
            config = tmp_path / f"agent-{index}.toml"
            config.write_text(
                CONFIG.format(
                    task=spec.task,
                    state=state,
                    index=index,
                    port=broker.port,
                    rpc=anvil,
                    contract=contract.address,
                )
                + (LITERT if index == 1 else "")
            )
            processes.append(
                subprocess.Popen(
                    [*AGENT, "--config", str(config)], stderr=subprocess.PIPE, text=True
                )
            )
        aggregator = Aggregator(
            spec=spec,
            public_context=owner.public_context,
            chain=chain.client(contract.address, aggregator_account),
            archive=Archive(tmp_path / "archive"),
            broker=broker.settings,
            expected=2,
            on_closed=closed.append,
        )
        # Execute
        owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
        aggregator.start()
        deadline = time.monotonic() + 60
        while len(owner.models) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        logs = [process.communicate(timeout=20)[1] for process in processes]
        aggregator.stop()
        owner.stop()
    # Assert: both rounds closed with both devices, the audit holds, the agents stopped cleanly
    assert [s.participants for s in closed] == [2, 2], logs
    report = audit_task(chain.client(contract.address), Archive(tmp_path / "archive"), spec.task)
    assert (report.verified, report.total) == (2, 2), report.as_dict()
    for process, log, state in zip(processes, logs, states, strict=True):
        assert process.returncode == 0, log[-2000:]
        assert "round 2 update included on chain" in log
        assert "LiteRT:" not in log  # the LiteRT device did not fall back to numpy
        assert stat.S_IMODE((state / "device.key").stat().st_mode) == 0o600
        assert (state / "privacy-ledger.json").exists()
        for round_no in (1, 2):  # the secret salts of the data commitments
            salt = state / "data-salts" / f"round-{round_no}"
            assert stat.S_IMODE(salt.stat().st_mode) == 0o600 and len(salt.read_bytes()) == 32


def test_a_corrupted_config_stops_the_agent_with_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('task = "0x12"\n')

    result = subprocess.run(
        [sys.executable, "-m", "truscl.cli", "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.strip() == f"truscl: {config}: task must be 0x and 64 hex digits"
    assert result.stdout == ""
