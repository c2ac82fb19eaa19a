"""A deployment as a user makes it, every step a ``truscl`` command (docs/deploy.md, in order).

Provision three devices and the broker (TLS, logins, ACL, a key guardian), start mosquitto from
that configuration, deploy the contract on anvil, register the devices, generate the task's key
with the guardian and create the task, run the owner, the guardian, the aggregator and the
three agents as separate processes, audit the two rounds, and stop everything with SIGTERM.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from truscl.broker import free_port
from truscl.chain import ChainClient, NodeChain
from truscl.chain.deployment import Deployment
from truscl.keyfile import load_account, write_secret

pytestmark = pytest.mark.slow
TRUSCL = str(Path(sys.executable).with_name("truscl"))
ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def truscl(*args: str | Path) -> str:
    """Run a command as a user types it; its stdout, or the test fails with its stderr."""
    result = subprocess.run([TRUSCL, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"truscl {' '.join(map(str, args))}:\n{result.stderr}"
    return result.stdout


def identity(broker: Path, name: str, folder: Path) -> str:
    """Copy a role's broker identity beside its config; its ``[broker]`` table, to paste."""
    for item in (broker / "clients" / name).iterdir():
        if item.name != "broker.toml":
            shutil.copy2(item, folder / item.name)
    return (broker / "clients" / name / "broker.toml").read_text()


def serve(role: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [TRUSCL, "--log-level", "INFO", role, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def test_a_fleet_deployed_step_by_step_runs_two_audited_rounds(anvil: str, tmp_path: Path) -> None:
    node = NodeChain(anvil)  # the testnet faucet: it only pays for the roles' gas
    keys = {}
    for role in ("admin", "owner", "aggregator", "guardian"):
        (tmp_path / role).mkdir()
        account = node.new_account()
        keys[role] = tmp_path / role / f"{role}.key"
        write_secret(keys[role], ("0x" + bytes(account.key).hex() + "\n").encode())
    broker_dir, deployment = tmp_path / "broker", tmp_path / "deployment.json"
    devices = [tmp_path / f"device-{index}" for index in range(3)]
    port = str(free_port())

    # 1. Each device gets its key; 2. the broker its CA, identities, logins and ACL
    addresses = [
        truscl("agent", "provision", "--out", d, "--hardware", "simulated").strip() for d in devices
    ]
    truscl(
        "broker", "provision", "--out", broker_dir, "--devices", *addresses,
        "--host", "127.0.0.1", "--port", port, "--bind", "127.0.0.1", "--guardians", "1",
    )  # fmt: skip
    mosquitto = subprocess.Popen([MOSQUITTO, "-c", str(broker_dir / "mosquitto.conf")])
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        _wait_for_port(int(port))
        # 3. The chain: deploy, register
        truscl("chain", "deploy", "--rpc", anvil, "--key", keys["admin"], "--out", deployment)
        truscl("chain", "register", *addresses, "--deployment", deployment, "--key", keys["admin"])
        record = Deployment.load(deployment)
        chain_table = f'\n[chain]\nrpc = "{anvil}"\ncontract = "{record.address}"\n'
        # 4. The owner creates the task
        task_file = (ROOT / "deploy" / "task.toml").read_text()
        for old, new in (
            ("rounds = 10", "rounds = 2"),
            ("window = 864", "window = 128"),
            ("min_readings = 576", "min_readings = 128"),
            ("batch_size = 32", "batch_size = 16"),
        ):
            task_file = task_file.replace(old, new)
        (tmp_path / "owner" / "task.toml").write_text(task_file)
        aggregator_address = load_account(keys["aggregator"]).address
        guardian_address = load_account(keys["guardian"]).address
        chosen = "0x" + secrets.token_hex(32)  # the task id, fixed before the key generation
        owner_toml = tmp_path / "owner" / "owner.toml"
        owner_toml.write_text(
            f'task_file = "task.toml"\naggregator = "{aggregator_address}"\n'
            f'task = "{chosen}"\n'
            '[owner]\nkey = "owner.key"\nstate = "state"\n'
            f'[guardians]\nguardian-1 = "{guardian_address}"\n'
            + identity(broker_dir, "owner", tmp_path / "owner")
            + chain_table
        )
        guardian_toml = tmp_path / "guardian" / "guardian.toml"
        guardian_toml.write_text(
            f'task = "{chosen}"\nowner = "{load_account(keys["owner"]).address}"\n'
            '[guardian]\nname = "guardian-1"\nkey = "guardian.key"\nstate = "state"\n'
            + identity(broker_dir, "guardian-1", tmp_path / "guardian")
            + chain_table
        )
        # A task whose rounds its privacy budget cannot pay for is refused with the figures;
        # the owner fixes the task file and runs init again
        greedy = task_file.replace("epsilon_budget = 8.0", "epsilon_budget = 2.0")
        (tmp_path / "owner" / "task.toml").write_text(greedy)
        refused = subprocess.run(
            [TRUSCL, "owner", "init", "--config", str(owner_toml)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        (tmp_path / "owner" / "task.toml").write_text(task_file)
        # The key generation: the guardian joins while the owner's init runs
        joining = subprocess.Popen(
            [TRUSCL, "guardian", "init", "--config", str(guardian_toml)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        task = truscl("owner", "init", "--config", owner_toml).strip()
        guardian_context, joined = joining.communicate(timeout=300)
        assert joining.returncode == 0, joined
        owner_status = truscl("owner", "status", "--config", owner_toml)
        # 5. The aggregator and the devices learn the task
        aggregator_toml = tmp_path / "aggregator" / "aggregator.toml"
        aggregator_toml.write_text(
            f'task = "{task}"\nexpected_devices = 3\n'
            '[aggregator]\nkey = "aggregator.key"\narchive = "archive"\n'
            + identity(broker_dir, "aggregator", tmp_path / "aggregator")
            + chain_table
        )
        for index, (folder, address) in enumerate(zip(devices, addresses, strict=True)):
            truscl(
                "agent", "provision", "--out", folder, "--task", task,
                "--deployment", deployment, "--hardware", "simulated",
                "--broker-identity", broker_dir / "clients" / address.lower(),
            )  # fmt: skip
            with (folder / "agent.toml").open("a") as config:  # the simulated room's settings
                config.write(f"room = {index}\nseed = 5\ntime_scale = 60000\nhistory = 128\n")
        # 6. Every role as a service
        processes["owner"] = serve("owner", owner_toml, tmp_path / "owner.log")
        processes["guardian"] = serve("guardian", guardian_toml, tmp_path / "guardian.log")
        processes["aggregator"] = serve("aggregator", aggregator_toml, tmp_path / "aggregator.log")
        for index, folder in enumerate(devices):
            processes[f"device-{index}"] = serve(
                "agent", folder / "agent.toml", tmp_path / f"device-{index}.log"
            )
        reader = ChainClient.at(node.web3(), record.address)
        deadline = time.monotonic() + 180
        while reader.model_hash(bytes.fromhex(task[2:]), 2) is None:
            assert time.monotonic() < deadline, _logs(tmp_path)
            assert all(p.poll() is None for p in processes.values()), _logs(tmp_path)
            time.sleep(0.2)
        audit = truscl(
            "audit", "--rpc", anvil, "--contract", record.address, "--task", task,
            "--archive", tmp_path / "aggregator" / "archive",
            "--keygen", tmp_path / "guardian" / "state" / "keygen.cbor",
        )  # fmt: skip
        status = truscl("agent", "status", "--config", devices[0] / "agent.toml")
        guardian_status = truscl("guardian", "status", "--config", guardian_toml)
    finally:
        codes = {}
        for name, process in processes.items():
            process.send_signal(signal.SIGTERM)
            codes[name] = process.wait(30)
        mosquitto.terminate()
        mosquitto.wait(10)

    assert refused.returncode == 1 and "over the budget 2" in refused.stderr, refused.stderr
    assert "the budget allows" in owner_status and task in owner_status
    assert task == chosen and "threshold (guardian-1, owner)" in owner_status
    context = ChainClient.at(NodeChain(anvil).web3(), record.address).task(bytes.fromhex(task[2:]))
    assert guardian_context.strip() == "0x" + context.context_hash.hex()
    assert "decrypted rounds [1, 2]" in guardian_status and "refused   none" in guardian_status
    assert "audit: 2/2 rounds verified" in audit
    assert "keygen: verified, the task's key was made by guardian-1, owner" in audit
    assert codes == dict.fromkeys(codes, 0), _logs(tmp_path)
    assert "registered on chain: yes" in status and "epsilon" in status


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)


def _logs(folder: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-8:])
        for log in sorted(folder.glob("*.log"))
    )
