"""docs/vectors.json: worked examples of every encoding docs/protocol.md describes.

Each vector is recomputed here from its inputs with truscl's own code and compared with the
file, so the document and the code cannot drift apart; a third party writing an auditor checks
their code against the same file. After a deliberate change to an encoding, regenerate it with
``python tests/test_vectors.py --write`` and say so in the change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from truscl.agent.contribution import data_leaf, data_root, data_salt
from truscl.agent.sensors import Reading
from truscl.privacy.threshold import PartialDecryption
from truscl.server.keygen import KeygenTerms
from truscl.task import TaskSpec
from truscl.wire import Domain, Update, merkle_proof, merkle_root, split, verify_proof
from truscl.wire.keyholders import SEED_COMMITMENT, SESSION, KeygenMessage, PartialMessage
from truscl.wire.merkle import EMPTY_ROOT
from truscl.wire.model import model_bytes
from truscl.wire.receipt import Receipt

VECTORS = Path(__file__).resolve().parents[1] / "docs" / "vectors.json"
DOMAIN = Domain(chain_id=31337, contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
DEVICE = Account.from_key(keccak(text="truscl test vector: device"))
AGGREGATOR = Account.from_key(keccak(text="truscl test vector: aggregator"))
OWNER = Account.from_key(keccak(text="truscl test vector: owner"))
GUARDIAN = Account.from_key(keccak(text="truscl test vector: guardian"))
TASK = keccak(text="truscl test vector: task")


def hexed(data: bytes) -> str:
    return "0x" + data.hex()


def digest(typed_data: dict[str, Any]) -> dict[str, str]:
    """The EIP-712 parts: domain separator, struct hash, and the digest that is signed."""
    message = encode_typed_data(full_message=typed_data)
    return {
        "domain_separator": hexed(message.header),
        "struct_hash": hexed(message.body),
        "digest": hexed(keccak(b"\x19" + message.version + message.header + message.body)),
    }


def update_vector(round_no: int, samples: int) -> tuple[Update, dict[str, Any]]:
    update = Update(
        task=TASK,
        round=round_no,
        device=bytes.fromhex(DEVICE.address[2:]),
        ciphertext=bytes(range(256)) * 2,  # any bytes: the encodings do not look inside
        context=keccak(text="truscl test vector: public HE context"),
        samples=samples,
        epsilon_micros=3_976_123,
        data_root=keccak(text="truscl test vector: data root"),
    ).signed(DEVICE, DOMAIN)
    return update, {
        "device": update.device_address,
        "round": round_no,
        "samples": samples,
        "cbor": hexed(update.encode()),
        "id": hexed(keccak(update.leaf() + update.signature)),
        "ciphertext_hash": hexed(update.ciphertext_hash),
        **digest(update.typed_data(DOMAIN)),
        "signature": hexed(update.signature),
        "leaf": hexed(update.leaf()),
    }


def data_vector() -> dict[str, Any]:
    """A window of three readings committed under one round secret, and one leaf opened."""
    secret = keccak(text="truscl test vector: round secret")
    window = [
        Reading(1704700800.0, 21.5, 40.25, 1013.25, 350.0, 640.0, True),
        Reading(1704701100.0, 21.5, 40.25, 1013.25, 350.0, 640.0, True),  # same sensor values
        Reading(1704701400.0, 20.75, 41.0, 1013.0, 0.0, 455.5, False),
    ]
    leaves = [data_leaf(secret, i, reading) for i, reading in enumerate(window)]
    return {
        "round_secret": hexed(secret),
        "readings": [hexed(reading.encode()) for reading in window],
        "salts": [hexed(data_salt(secret, i)) for i in range(len(window))],
        "leaves": [hexed(leaf) for leaf in leaves],
        "root": hexed(data_root(secret, window)),
        "opened": {
            "index": 1,
            "salt": hexed(data_salt(secret, 1)),
            "reading": hexed(window[1].encode()),
            "proof": [hexed(p) for p in merkle_proof(leaves, leaves[1])],
        },
    }


def compute() -> dict[str, Any]:
    updates = [update_vector(round_no=3, samples=s) for s in (864, 700, 512)]
    leaves = [u.leaf() for u, _ in updates]
    receipt = Receipt(
        task=TASK,
        round=3,
        device=updates[0][0].device,
        update=keccak(updates[0][0].leaf() + updates[0][0].signature),
        accepted=True,
        reason="",
        counted_in=3,
    ).signed(AGGREGATOR, DOMAIN)
    blob = bytes(i % 251 for i in range(3000))
    spec = TaskSpec(
        task=hexed(TASK),
        rounds=10,
        quorum=3,
        he_profile="ckks-4096-60-49",
        context_hash=hexed(keccak(text="truscl test vector: public HE context")),
        feature_offsets=(22.5, 45.0, 500.0, 1200.0),
        feature_scales=(7.5, 25.0, 500.0, 800.0),
    )
    params = [0.5, -1.25, 3.0, 0.0, -0.001]
    holders = (("guardian-1", GUARDIAN.address.lower()), ("owner", OWNER.address.lower()))
    threshold_spec = TaskSpec(
        **{
            **spec.to_dict(),
            "dp": spec.dp,
            "key_holders": holders,
            "keygen_digest": hexed(keccak(text="truscl test vector: transcript digest")),
        }
    )
    session = KeygenMessage(
        TASK, "owner", SESSION, KeygenTerms("ckks-4096-60-49", holders).encode()
    ).signed(OWNER, DOMAIN)
    commitment = KeygenMessage(
        TASK, "guardian-1", SEED_COMMITMENT, keccak(text="truscl test vector: a commitment")
    ).signed(GUARDIAN, DOMAIN)
    aggregate_hash = keccak(text="truscl test vector: aggregate")
    # A real partial is (ciphertexts, data primes, N) residues; two by four keep the vector short
    tiny = PartialDecryption(
        "guardian-1", aggregate_hash, np.arange(8, dtype=np.uint64).reshape(1, 2, 4)
    )
    partial = PartialMessage(TASK, 3, "guardian-1", aggregate_hash, tiny.to_bytes()).signed(
        GUARDIAN, DOMAIN
    )
    return {
        "domain": {
            "name": "truscl",
            "version": "1",
            "chainId": DOMAIN.chain_id,
            "verifyingContract": DOMAIN.contract,
        },
        "keys": {
            "device": hexed(bytes(DEVICE.key)),
            "aggregator": hexed(bytes(AGGREGATOR.key)),
            "owner": hexed(bytes(OWNER.key)),
            "guardian": hexed(bytes(GUARDIAN.key)),
        },
        "updates": [vector for _, vector in updates],
        "merkle": {
            "leaves": [hexed(leaf) for leaf in leaves],
            "root": hexed(merkle_root(leaves)),
            "proofs": {
                hexed(leaf): [hexed(p) for p in merkle_proof(leaves, leaf)] for leaf in leaves
            },
            "empty_root": hexed(EMPTY_ROOT),
        },
        "receipt": {
            "aggregator": AGGREGATOR.address,
            "cbor": hexed(receipt.encode()),
            **digest(receipt.typed_data(DOMAIN)),
            "signature": hexed(receipt.signature),
        },
        "chunks": {
            "blob": hexed(blob),
            "blob_id": hexed(keccak(blob)),
            "max_message": 1024,
            "messages": [hexed(chunk) for chunk in split(blob, 1024)],
        },
        "spec": {"cbor": hexed(spec.encode()), "hash": hexed(spec.hash())},
        "threshold_spec": {
            "cbor": hexed(threshold_spec.encode()),
            "hash": hexed(threshold_spec.hash()),
        },
        "keygen": [
            {
                "signer": account.address,
                "data": hexed(message.data),
                "cbor": hexed(message.encode()),
                **digest(message.typed_data(DOMAIN)),
                "signature": hexed(message.signature),
            }
            for message, account in ((session, OWNER), (commitment, GUARDIAN))
        ],
        "partial": {
            "signer": GUARDIAN.address,
            "partial": hexed(partial.partial),
            "cbor": hexed(partial.encode()),
            **digest(partial.typed_data(DOMAIN)),
            "signature": hexed(partial.signature),
        },
        "data": data_vector(),
        "model": {
            "params": params,
            "bytes": hexed(model_bytes(np.asarray(params))),
            "hash": hexed(keccak(model_bytes(np.asarray(params)))),
        },
    }


def test_the_documented_vectors_are_what_truscl_computes() -> None:
    stored = json.loads(VECTORS.read_text())

    assert compute() == stored


def test_the_vectors_verify_as_a_third_party_would() -> None:
    stored = json.loads(VECTORS.read_text())
    domain = Domain(stored["domain"]["chainId"], stored["domain"]["verifyingContract"])
    for vector in stored["updates"]:
        update = Update.decode(bytes.fromhex(vector["cbor"][2:]))
        assert update.signer(domain) == vector["device"]
    receipt = Receipt.decode(bytes.fromhex(stored["receipt"]["cbor"][2:]))
    receipt.verify(domain, stored["receipt"]["aggregator"])
    for vector in stored["keygen"]:
        KeygenMessage.decode(bytes.fromhex(vector["cbor"][2:])).verify(domain, vector["signer"])
    partial = PartialMessage.decode(bytes.fromhex(stored["partial"]["cbor"][2:]))
    partial.verify(domain, stored["partial"]["signer"])
    assert PartialDecryption.from_bytes(partial.partial).polys.tolist() == [
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    ]
    leaves = [bytes.fromhex(leaf[2:]) for leaf in stored["merkle"]["leaves"]]
    assert hexed(merkle_root(list(reversed(leaves)))) == stored["merkle"]["root"]


def test_an_opened_data_leaf_verifies_from_its_salt_and_reading_alone() -> None:
    # What a verifier of a data-contribution proof holds: the root (signed in the update), and
    # the opened leaf's salt, reading and proof; never the round secret
    data = json.loads(VECTORS.read_text())["data"]
    opened = data["opened"]
    salt, reading = bytes.fromhex(opened["salt"][2:]), bytes.fromhex(opened["reading"][2:])
    secret = bytes.fromhex(data["round_secret"][2:])

    leaf = keccak(salt + reading)

    assert salt == keccak(secret + opened["index"].to_bytes(32, "big"))
    assert verify_proof(leaf, [bytes.fromhex(p[2:]) for p in opened["proof"]],
                        bytes.fromhex(data["root"][2:]))  # fmt: skip
    # a correct guess of a sibling reading, salted with the opened salt, is no leaf of the tree
    assert hexed(keccak(salt + bytes.fromhex(data["readings"][0][2:]))) not in data["leaves"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        VECTORS.write_text(json.dumps(compute(), indent=1) + "\n")
        print(f"wrote {VECTORS}")
    else:
        sys.exit("usage: python tests/test_vectors.py --write")
