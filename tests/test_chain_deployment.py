"""Deployment records on the in-process EVM, and RPC failures as one clear line."""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_utils import keccak
from web3 import Web3

from truscl.broker import free_port
from truscl.chain import ChainClient, Deployment, EmbeddedChain, deploy
from truscl.chain.deployment import artifact_code_hash, code_hash, status
from truscl.chain.rpc import connect, rpc_errors
from truscl.contracts import load_artifact
from truscl.errors import ChainError, ConfigError

SPEC, CONTEXT = keccak(text="spec"), keccak(text="context")


@pytest.fixture(scope="module")
def chain() -> EmbeddedChain:
    return EmbeddedChain()


@pytest.fixture(scope="module")
def deployment(chain: EmbeddedChain) -> Deployment:
    return deploy(chain.web3(), chain.new_account(), lock=chain.lock)


# --- the record ----------------------------------------------------------------------------


def test_deploy_records_where_and_how_the_contract_was_made(
    chain: EmbeddedChain, deployment: Deployment
) -> None:
    w3 = chain.web3()
    receipt = w3.eth.get_transaction_receipt(deployment.tx_hash)  # type: ignore[arg-type]

    assert deployment.address == receipt["contractAddress"]
    assert deployment.deployment_block == receipt["blockNumber"]
    assert deployment.deployer == receipt["from"]
    assert deployment.chain_id == w3.eth.chain_id
    assert deployment.rpc_url is None  # the in-process EVM has no URL
    assert deployment.artifact_hash == code_hash(w3, deployment.address) == artifact_code_hash()
    assert ChainClient.at(w3, deployment.address).deployment_block() == receipt["blockNumber"]
    deployment.verify(w3)


def test_a_record_survives_a_round_trip_through_json(
    deployment: Deployment, tmp_path: Path
) -> None:
    path = tmp_path / "deployment.json"

    deployment.save(path)

    assert Deployment.load(path) == deployment
    assert sorted(json.loads(path.read_text())) == sorted(
        ["address", "chain_id", "deployment_block", "artifact_hash", "deployer", "tx_hash",
         "rpc_url"]
    )  # fmt: skip


def test_a_record_is_never_overwritten(deployment: Deployment, tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    path.write_text("precious\n")

    with pytest.raises(ConfigError, match="already exists"):
        deployment.save(path)
    assert path.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: "not json", "is not JSON"),
        (lambda d: [d], "expected a JSON object"),
        (lambda d: {k: v for k, v in d.items() if k != "tx_hash"}, r"missing keys \['tx_hash'\]"),
        (lambda d: {**d, "extra": 1}, r"unexpected keys \['extra'\]"),
        (lambda d: {**d, "address": "0x1234"}, "address must be an address"),
        (lambda d: {**d, "chain_id": "31337"}, "chain_id must be an integer"),
        (lambda d: {**d, "deployment_block": -1}, "deployment_block must be an integer"),
        (lambda d: {**d, "deployment_block": True}, "deployment_block must be an integer"),
        (lambda d: {**d, "artifact_hash": "0x12"}, "artifact_hash must be 0x and 64"),
        (lambda d: {**d, "tx_hash": "0x" + "zz" * 32}, "tx_hash must be 0x and 64"),
        (lambda d: {**d, "rpc_url": 8545}, "rpc_url must be a string or null"),
    ],
)
def test_a_damaged_record_is_refused_with_the_field_named(
    deployment: Deployment, tmp_path: Path, change: object, message: str
) -> None:
    path = tmp_path / "deployment.json"
    damaged = change(deployment.as_dict())  # type: ignore[operator]
    path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))

    with pytest.raises(ConfigError, match=message) as caught:
        Deployment.load(path)
    assert str(path) in str(caught.value)


def test_a_missing_record_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Deployment.load(tmp_path / "none.json")


# --- verification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("deployment_block", 1, "deployed in block"),
        ("chain_id", 5, "record on chain 5"),
        ("artifact_hash", "0x" + "00" * 32, "not the code the record names"),
    ],
)
def test_a_record_that_no_longer_describes_the_chain_is_refused(
    chain: EmbeddedChain, deployment: Deployment, field: str, value: object, message: str
) -> None:
    wrong = dataclasses.replace(deployment, **{field: value})

    with pytest.raises(ChainError, match=message):
        wrong.verify(chain.web3())


def test_a_record_of_an_address_without_code_is_refused(
    chain: EmbeddedChain, deployment: Deployment
) -> None:
    wrong = dataclasses.replace(deployment, address=Account.create().address)

    with pytest.raises(ChainError, match="no contract at"):
        wrong.verify(chain.web3())


def test_other_code_at_the_address_is_not_taken_for_ours(chain: EmbeddedChain) -> None:
    # Prepare: a contract whose runtime code is one STOP byte, deployed like any other
    w3 = chain.web3()
    creation = "0x6001600c60003960016000f300"  # codecopy 1 byte from offset 12, return it
    tx = w3.eth.send_transaction({"from": w3.eth.accounts[0], "data": creation})
    other = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
    assert bytes(w3.eth.get_code(other)) == b"\x00"

    # Execute / Assert
    assert code_hash(w3, other) != artifact_code_hash()
    described = status(w3, other)
    assert not described.code_matches and described.deployment_block is None


def test_an_unfunded_key_cannot_deploy(chain: EmbeddedChain) -> None:
    with pytest.raises(ChainError, match="has no funds"):
        deploy(chain.web3(), Account.create(), lock=chain.lock)


def test_the_artifact_hash_is_of_the_runtime_code() -> None:
    artifact = load_artifact("Truscl")

    assert artifact_code_hash() == "0x" + keccak(hexstr=artifact["deployedBytecode"]).hex()


# --- status --------------------------------------------------------------------------------


def test_status_counts_devices_and_tasks_from_the_logs(chain: EmbeddedChain) -> None:
    # Prepare: a deployment of its own, so other tests' registrations do not count
    w3 = chain.web3()
    admin, owner, aggregator = (chain.new_account() for _ in range(3))
    record = deploy(w3, admin, lock=chain.lock)
    registrar = ChainClient.at(w3, record.address, admin, chain.lock)
    for _ in range(3):
        registrar.register_device(Account.create().address)
    task_id = keccak(text="status")
    ChainClient.at(w3, record.address, owner, chain.lock).create_task(
        task_id,
        SPEC,
        CONTEXT,
        aggregator.address,
        4,
        epsilon_micros=1,
        budget_micros=1,
        min_cohort=2,
    )
    ChainClient.at(w3, record.address, aggregator, chain.lock).anchor_round(
        task_id, 1, keccak(b"r"), keccak(b"a"), 3
    )

    # Execute
    found = status(w3, record.address)

    # Assert
    assert found.code_matches and found.deployment_block == record.deployment_block
    assert found.devices == 3
    assert [(t.task, t.owner, t.rounds, t.rounds_anchored) for t in found.tasks] == [
        ("0x" + task_id.hex(), owner.address, 4, 1)
    ]
    assert json.loads(json.dumps(found.as_dict()))["devices"] == 3


def test_status_reads_logs_in_spans(chain: EmbeddedChain) -> None:
    # A provider's cap on the block range of eth_getLogs: spans of 1 block still count them all
    w3 = chain.web3()
    admin = chain.new_account()
    record = deploy(w3, admin, lock=chain.lock)
    registrar = ChainClient.at(w3, record.address, admin, chain.lock)
    for _ in range(2):
        registrar.register_device(Account.create().address)

    assert status(w3, record.address, span=1).devices == 2


def test_status_of_an_address_without_code_is_an_error(chain: EmbeddedChain) -> None:
    with pytest.raises(ChainError, match="no contract at"):
        status(chain.web3(), Account.create().address)


# --- reaching a node -----------------------------------------------------------------------


def test_a_dead_rpc_url_is_one_line_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(ChainError, match="cannot reach a JSON-RPC node at") as caught:
        connect(url)
    assert url in str(caught.value) and "\n" not in str(caught.value)
    assert "refused" in str(caught.value).lower()


def test_an_url_that_is_not_http_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        connect("127.0.0.1:8545")


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers: a hung provider."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_node_that_never_answers_times_out_in_one_line(silent_server: str) -> None:
    with pytest.raises(ChainError, match="did not answer in time") as caught:
        connect(silent_server, timeout=0.2)
    assert silent_server in str(caught.value)


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


def test_a_web_server_that_is_not_a_node_is_named_as_such() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ChainError, match="answered HTTP 404, not JSON-RPC"):
            connect(url)
    finally:
        server.shutdown()
        server.server_close()


def test_rpc_errors_let_truscl_errors_through() -> None:
    with pytest.raises(ConfigError, match="mine"), rpc_errors("http://x"):
        raise ConfigError("mine")
    with pytest.raises(ChainError, match="http://x"), rpc_errors("http://x"):
        Web3(Web3.HTTPProvider("http://127.0.0.1:1")).eth.chain_id  # noqa: B018
