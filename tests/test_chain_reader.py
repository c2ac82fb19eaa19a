"""The device's chain reads: ``RpcReader`` (eth_call without web3) answers as ``ChainClient`` does.

One suite, run against both readers on the same node (web3.py's way of testing backends), plus
the failures a device meets: a dead node, a hung one, a web server that is not a node.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account import Account

from truscl.broker import free_port
from truscl.chain import ChainClient, NodeChain
from truscl.chain.reader import ChainReader, RpcReader
from truscl.errors import ChainError, ConfigError
from truscl.wire import UpdateRecord, merkle_proof, merkle_root

TASK = bytes.fromhex("aa" * 32)


@dataclass
class Scene:
    """A task with round 1 anchored over two updates and model 0 published."""

    node: str
    client: ChainClient
    aggregator: str
    device: str
    stranger: str
    records: list[UpdateRecord]
    model_hash: bytes
    chain_id: int


def _record(device: str, round_no: int) -> UpdateRecord:
    return UpdateRecord(
        task=TASK,
        round=round_no,
        device=device,
        ciphertext_hash=os.urandom(32),
        context=b"\x02" * 32,
        samples=128,
        epsilon_micros=250_000,
        data_root=os.urandom(32),
    )


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    from truscl.chain.anvil import Anvil, find_anvil

    try:
        find_anvil()
    except ConfigError:
        pytest.skip("anvil is not installed: run `npm ci` in contracts/ (scripts/test does)")
    with Anvil() as node:
        chain = NodeChain(node.url)
        admin, aggregator = chain.new_account(), chain.new_account()
        owner_client = ChainClient.deploy(chain.web3(), admin, chain.lock)
        device, other = Account.create().address, Account.create().address
        owner_client.register_device(device)
        owner_client.register_device(other)
        owner_client.create_task(
            TASK, b"\x01" * 32, b"\x02" * 32, aggregator.address, 3,
            epsilon_micros=3_000_000, budget_micros=8_000_000, min_cohort=2,
        )  # fmt: skip
        records = [_record(device, 1), _record(other, 1)]
        leaves = [r.leaf() for r in records]
        chain.client(owner_client.address, aggregator).anchor_round(
            TASK, 1, merkle_root(leaves), b"\x03" * 32, 2
        )
        model_hash = b"\x04" * 32
        owner_client.publish_model(TASK, 0, model_hash)
        yield Scene(
            node.url, owner_client, aggregator.address, device,
            Account.create().address, records, model_hash, chain.web3().eth.chain_id,
        )  # fmt: skip


@pytest.fixture(params=["RpcReader", "ChainClient"])
def reader(request: pytest.FixtureRequest, scene: Scene) -> Iterator[ChainReader]:
    if request.param == "ChainClient":
        yield scene.client
        return
    rpc = RpcReader(scene.node, scene.client.address)
    yield rpc
    rpc.close()


@pytest.mark.slow
def test_the_task_terms_and_the_aggregator(reader: ChainReader, scene: Scene) -> None:
    task = reader.task(TASK)

    assert (task.spec_hash, task.context_hash) == (b"\x01" * 32, b"\x02" * 32)
    assert task.aggregator == scene.aggregator
    assert (task.rounds, task.rounds_anchored) == (3, 1)
    assert (task.epsilon_micros, task.epsilon_budget_micros) == (3_000_000, 8_000_000)
    assert (reader.chain_id, reader.address) == (scene.chain_id, scene.client.address)


@pytest.mark.slow
def test_an_unknown_task_is_the_contracts_own_error(reader: ChainReader) -> None:
    with pytest.raises(ChainError, match="UnknownTask"):
        reader.task(b"\xbb" * 32)


@pytest.mark.slow
def test_model_hashes_published_and_not(reader: ChainReader, scene: Scene) -> None:
    assert reader.model_hash(TASK, 0) == scene.model_hash
    assert reader.model_hash(TASK, 1) is None


@pytest.mark.slow
def test_an_update_in_the_anchored_root_verifies_and_others_do_not(
    reader: ChainReader, scene: Scene
) -> None:
    # Prepare
    ours, theirs = scene.records
    leaves = [r.leaf() for r in scene.records]
    proof = merkle_proof(leaves, ours.leaf())

    # Execute and assert
    assert reader.verify_update(ours, proof)
    assert reader.verify_update(theirs, merkle_proof(leaves, theirs.leaf()))
    assert not reader.verify_update(ours, proof, counted_in=2)  # round 2 is not anchored
    assert not reader.verify_update(_record(scene.device, 1), proof)  # not in the tree


@pytest.mark.slow
def test_registered_devices(reader: ChainReader, scene: Scene) -> None:
    assert reader.is_device(scene.device)
    assert not reader.is_device(scene.stranger)


# --- a node that cannot be used ------------------------------------------------------------

CONTRACT = "0x" + "11" * 20


def test_a_dead_node_is_one_line_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(ChainError, match="cannot reach a JSON-RPC node at") as caught:
        RpcReader(url, CONTRACT).model_hash(TASK, 0)
    assert url in str(caught.value) and "\n" not in str(caught.value)
    assert "refused" in str(caught.value).lower()


def test_a_url_that_is_not_http_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        RpcReader("127.0.0.1:8545", CONTRACT)


def test_a_node_that_never_answers_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(ChainError, match="did not answer in time") as caught:
            RpcReader(url, CONTRACT, timeout=0.2).task(TASK)
    finally:
        listener.close()
    assert url in str(caught.value)


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 404
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, b"", "answered HTTP 404, not JSON-RPC"),
        (200, b"<html>hello</html>", "is not a JSON-RPC endpoint"),
        (200, b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}', "refused: no"),
        (200, b'{"jsonrpc":"2.0","id":1,"result":"0x12"}', "unexpected answer"),
    ],
)
def test_a_server_that_is_not_a_working_node_is_named_as_such(
    status: int, body: bytes, expected: str
) -> None:
    handler = type("Handler", (_Answer,), {"status": status, "body": body})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ChainError, match=expected) as caught:
            RpcReader(url, CONTRACT).model_hash(TASK, 0)
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in str(caught.value)
