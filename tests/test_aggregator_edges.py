"""What the aggregator meets at its edges: hostile chunks (memory caps, bignums), a node that
cannot be reached (every failure a ``ChainError`` naming it), and the registry cache."""

from __future__ import annotations

import cbor2
import pytest
from eth_account import Account
from web3 import Web3

from truscl.broker import free_port
from truscl.chain import ChainClient, EmbeddedChain
from truscl.contracts import load_artifact
from truscl.errors import ChainError, ProtocolError
from truscl.server.registry import RegistryCache
from truscl.wire import envelope, split
from truscl.wire.chunking import PIECE_OVERHEAD, ChunkRejected, Reassembler
from truscl.wire.update import UPDATE_FIELDS


def test_senders_cycling_topics_cannot_grow_reassembly_past_its_total() -> None:
    # Prepare: a small total, and an attacker that starts a blob under a new topic each time
    reassembler = Reassembler(max_message=2000, max_total=20_000, max_partials=1000)
    reasons: list[str] = []
    # Execute
    for n in range(200):
        first_of_two = split(bytes([n % 256]) * 3000, 2000)[0]
        try:
            reassembler.add(f"attacker-{n}", first_of_two)
        except ChunkRejected as exc:
            reasons.append(exc.reason)
        assert reassembler.held_bytes <= 20_000
    # Assert: most were refused for the total; an honest blob fits again once those expire
    assert set(reasons) == {"reassembly-full"} and len(reasons) > 180
    assert reassembler.pending * (1872 + PIECE_OVERHEAD) <= 20_000


def test_partial_blobs_are_capped_in_number_even_when_empty() -> None:
    reassembler = Reassembler(max_message=2000, max_partials=8)
    empty = envelope.encode("chunk", blob=b"\x01" * 32, index=0, count=2, data=b"")
    for n in range(8):
        assert reassembler.add(f"s{n}", empty) is None
    with pytest.raises(ChunkRejected) as refused:
        reassembler.add("s9", empty)
    assert refused.value.reason == "reassembly-full"


def test_expired_partials_give_their_room_back() -> None:
    now = [0.0]
    reassembler = Reassembler(max_message=2000, max_total=3_000, ttl=10, clock=lambda: now[0])
    reassembler.add("slow", split(b"\x07" * 3000, 2000)[0])
    with pytest.raises(ChunkRejected):
        reassembler.add("other", split(b"\x08" * 3000, 2000)[0])
    now[0] = 11.0
    assert reassembler.add("other", split(b"\x08" * 3000, 2000)[0]) is None
    assert reassembler.held_bytes == 1872 + PIECE_OVERHEAD


def bignum_chunk() -> bytes:
    """A chunk whose index is a CBOR bignum (tag 2): cbor2 decodes it to a Python int."""
    message = {
        "v": envelope.VERSION,
        "type": "chunk",
        "blob": b"\x01" * 32,
        "count": 1,
        "data": b"x",
    }
    encoded = cbor2.dumps(message, canonical=True)
    # one more pair: "index" -> tag 2 over 9 bytes (2^64)
    body = encoded[1:]
    return bytes([encoded[0] + 1]) + body + cbor2.dumps("index") + b"\xc2\x49\x01" + bytes(8)


def test_a_bignum_in_an_integer_field_is_refused_with_a_reason() -> None:
    payload = bignum_chunk()
    assert cbor2.loads(payload)["index"] == 2**64  # what a silent decoder would pass on
    with pytest.raises(ChunkRejected, match="index out of range: a bignum") as refused:
        Reassembler().add("someone", payload)
    assert refused.value.reason == "chunk-malformed"
    for field in ("round", "samples", "epsilon_micros"):
        fields = {f.cbor: b"\x00" * 32 for f in UPDATE_FIELDS} | {"signature": b"\x00" * 65}
        fields.update(round=1, samples=1, epsilon_micros=1, device=b"\x00" * 20)
        fields[field] = 2**70
        message = cbor2.dumps({"v": envelope.VERSION, "type": "update", **fields})
        with pytest.raises(ProtocolError, match="bignum"):
            envelope.decode(message, "update", 10_000)


def unreachable_client() -> tuple[ChainClient, str]:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    w3 = Web3(Web3.HTTPProvider(url, exception_retry_configuration=None))
    return ChainClient.at(w3, "0x" + "12" * 20, Account.create()), url


def test_every_call_to_an_unreachable_node_is_a_chain_error_naming_it() -> None:
    client, url = unreachable_client()
    task = b"\x01" * 32
    calls = {
        "is_device": lambda: client.is_device("0x" + "34" * 20),
        "round_anchor": lambda: client.round_anchor(task, 1),
        "anchor_tx": lambda: client.anchor_tx(task, 1),
        "model_hash": lambda: client.model_hash(task, 0),
        "task": lambda: client.task(task),
        "block_number": client.block_number,
        "registered_devices": lambda: client.registered_devices(0, 10),
        "anchor_round": lambda: client.anchor_round(task, 1, task, task, 1),
        "register_device": lambda: client.register_device("0x" + "34" * 20),
    }
    for name, call in calls.items():
        with pytest.raises(ChainError, match=url):
            call()
            pytest.fail(f"{name} did not fail")


def test_the_registrations_read_are_those_web3_decodes_from_the_contract_events() -> None:
    # Prepare: devices registered one block each on two deployments of the contract (the same
    # event, two addresses); web3's own ABI decoding of the first one's events as the reference
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    other = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    devices = [Account.create().address for _ in range(4)]
    for index, device in enumerate(devices):
        (contract if index != 2 else other).register_device(device)
    events = chain.web3().eth.contract(address=contract.address, abi=load_artifact("Truscl")["abi"])
    head = contract.block_number()
    # Execute
    read = contract.registered_devices(0, head)
    decoded = [
        log["args"]["device"] for log in events.events.DeviceRegistered.get_logs(from_block=0)
    ]
    # Assert: the same devices in the same order, none of the other deployment's; a range
    # that ends before the last registration leaves it out
    assert read == decoded == [devices[0], devices[1], devices[3]]
    assert contract.registered_devices(0, head - 1) == decoded[:2]
    assert other.registered_devices(0, head) == [devices[2]]


def test_the_registry_cache_follows_registrations_and_waits_when_the_node_is_away() -> None:
    # Prepare: a chain with one device, a cache on a clock the test moves
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    first, second, stranger = (Account.create().address for _ in range(3))
    contract.register_device(first)
    now = [0.0]
    cache = RegistryCache(contract, refresh_s=5.0, clock=lambda: now[0])
    # Execute and assert: the first look-up scans from the deployment block
    assert cache.known(first) and not cache.known(stranger)
    contract.register_device(second)
    now[0] = 1.0
    assert not cache.known(second)  # within the refresh interval: the cache answers alone
    now[0] = 6.0
    assert cache.known(second) and cache.known(first.lower()) and len(cache) == 2
    # an unreachable node: a stale cache cannot say "unknown", it raises to make the caller wait
    away, url = unreachable_client()
    stale = RegistryCache(away, refresh_s=5.0, clock=lambda: now[0])
    with pytest.raises(ChainError, match=url):
        stale.known(first)
