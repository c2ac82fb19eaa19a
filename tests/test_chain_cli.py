"""``truscl chain`` against a real node (anvil), each command run as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account

from truscl.broker import free_port
from truscl.chain import NodeChain

pytestmark = pytest.mark.slow

TRUSCL = Path(sys.executable).with_name("truscl")


def truscl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRUSCL), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def key_file(path: Path, key: bytes, mode: int = 0o600) -> Path:
    """A key pasted as an operator would: hex text, 0x, trailing newline."""
    path.write_text("0x" + key.hex() + "\n")
    os.chmod(path, mode)
    return path


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("truscl: "), result.stderr
    return lines[0]


def test_deploy_register_and_status_as_an_operator(anvil: str, tmp_path: Path) -> None:
    # Prepare: a fresh admin key, funded by anvil's unlocked account as a faucet would
    admin = Account.create()
    NodeChain(anvil).fund(admin.address, 10**18)
    admin_key = key_file(tmp_path / "admin.key", bytes(admin.key))
    record_file = tmp_path / "deployment.json"
    devices = [Account.create().address for _ in range(3)]

    # Execute: deploy
    deployed = truscl("chain", "deploy", "--rpc", anvil, "--key", admin_key, "--out", record_file)

    # Assert
    assert deployed.returncode == 0, deployed.stderr
    record = json.loads(record_file.read_text())
    assert f"address   {record['address']}" in deployed.stdout
    assert "chain id  31337" in deployed.stdout
    assert f"block     {record['deployment_block']}" in deployed.stdout
    assert record["deployer"] == admin.address and record["rpc_url"] == anvil

    # Execute: register three devices from the record, then one again by URL and address
    first = truscl("chain", "register", *devices, "--deployment", record_file, "--key", admin_key)
    again = truscl(
        "chain", "register", devices[1], "--rpc", anvil, "--contract", record["address"],
        "--key", admin_key,
    )  # fmt: skip

    # Assert
    assert first.returncode == 0, first.stderr
    assert all(f"{d}  registered (tx 0x" in first.stdout for d in devices)
    assert "registered 3, already registered 0, failed 0" in first.stdout
    assert again.returncode == 0, again.stderr
    assert f"{devices[1]}  already registered, skipped" in again.stdout
    assert "registered 0, already registered 1, failed 0" in again.stdout

    # Execute: status, with no key
    status_file = tmp_path / "status.json"
    status = truscl("chain", "status", "--deployment", record_file, "--json", status_file)

    # Assert
    assert status.returncode == 0, status.stdout + status.stderr
    assert "devices           3 registered" in status.stdout
    assert f"deployment block  {record['deployment_block']} (read from the contract)" in (
        status.stdout
    )
    assert "matches this truscl's artifact" in status.stdout
    assert "record            matches the chain" in status.stdout
    report = json.loads(status_file.read_text())
    assert (report["devices"], report["deployment_block"], report["chain_id"]) == (
        3, record["deployment_block"], 31337,
    )  # fmt: skip
    assert report["code_matches"] and report["record_problems"] == []
    assert report["code_hash"] == record["artifact_hash"]

    # And without the record: the address alone is enough for an auditor
    by_address = truscl("chain", "status", "--rpc", anvil, "--contract", record["address"])
    assert by_address.returncode == 0 and "devices           3 registered" in by_address.stdout


def test_operator_mistakes_are_one_clear_line(anvil: str, tmp_path: Path) -> None:
    # Prepare
    admin = Account.create()
    NodeChain(anvil).fund(admin.address, 10**18)
    admin_key = key_file(tmp_path / "admin.key", bytes(admin.key))
    loose_key = key_file(tmp_path / "loose.key", bytes(admin.key), mode=0o644)
    unfunded_key = key_file(tmp_path / "unfunded.key", bytes(Account.create().key))
    dead = f"http://127.0.0.1:{free_port()}"
    record_file = tmp_path / "deployment.json"
    deployed = truscl("chain", "deploy", "--rpc", anvil, "--key", admin_key, "--out", record_file)
    assert deployed.returncode == 0, deployed.stderr
    contract = json.loads(record_file.read_text())["address"]
    device = Account.create().address

    # Execute / Assert: a dead RPC URL
    error = one_line_error(truscl("chain", "status", "--rpc", dead, "--contract", contract))
    assert dead in error and "cannot reach" in error
    error = one_line_error(
        truscl("chain", "deploy", "--rpc", dead, "--key", admin_key, "--out", tmp_path / "x.json")
    )
    assert dead in error

    # A key file others can read, a missing one, an unfunded one
    error = one_line_error(
        truscl("chain", "register", device, "--deployment", record_file, "--key", loose_key)
    )
    assert "mode 0644; it must be 0600" in error
    error = one_line_error(
        truscl(
            "chain",
            "deploy",
            "--rpc",
            anvil,
            "--key",
            tmp_path / "none",
            "--out",
            tmp_path / "x.json",
        )
    )
    assert "does not exist" in error
    error = one_line_error(
        truscl(
            "chain", "deploy", "--rpc", anvil, "--key", unfunded_key, "--out", tmp_path / "y.json"
        )
    )
    assert "has no funds" in error

    # A key that is not a registrar, an address with no contract, a record in the way
    error = one_line_error(
        truscl("chain", "register", device, "--deployment", record_file, "--key", unfunded_key)
    )
    assert "is not a registrar" in error
    stranger = Account.create().address
    error = one_line_error(truscl("chain", "status", "--rpc", anvil, "--contract", stranger))
    assert f"no contract at {stranger}" in error
    error = one_line_error(
        truscl("chain", "deploy", "--rpc", anvil, "--key", admin_key, "--out", record_file)
    )
    assert "already exists" in error
    error = one_line_error(truscl("chain", "status", "--deployment", tmp_path / "none.json"))
    assert "does not exist" in error


def test_a_fleet_is_registered_in_a_block_or_two_not_a_block_per_device() -> None:
    # Prepare: a node that mines every second, as a public chain mines every few, and a
    # device already registered
    from truscl.chain import ChainClient
    from truscl.chain.anvil import Anvil
    from truscl.errors import ChainError

    with Anvil() as anvil:
        node = NodeChain(anvil.url)
        contract = ChainClient.deploy(node.web3(), node.new_account(), node.lock)
        devices = [Account.create().address for _ in range(6)]
        contract.register_device(devices[2])
        node.web3().provider.make_request("evm_setAutomine", [False])
        node.web3().provider.make_request("evm_setIntervalMining", [1])

        # Execute
        outcomes = contract.register_devices(devices)

        # Assert: the new ones registered, each with its own mined transaction, all of them in
        # at most two blocks; the registered one refused with the contract's reason
        refused = outcomes.pop(2)
        assert isinstance(refused, ChainError) and "DeviceAlreadyRegistered" in str(refused)
        assert all(isinstance(o, str) for o in outcomes) and len(set(outcomes)) == 5
        blocks = {node.web3().eth.get_transaction_receipt(o)["blockNumber"] for o in outcomes}
        assert len(blocks) <= 2
        assert all(contract.is_device(d) for d in devices)
