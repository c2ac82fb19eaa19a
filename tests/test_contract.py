"""The Truscl contract on the embedded EVM, driven through the real ChainClient.

One chain and one deployment per module keep the file fast; each test opens its own task, so
tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from eth_utils import keccak

from truscl.chain import GAS_LIMITS, ChainClient, EmbeddedChain, RoundAnchor
from truscl.contracts import load_artifact
from truscl.errors import ChainError
from truscl.wire.merkle import merkle_proof, merkle_root, verify_proof
from truscl.wire.update import UpdateRecord

CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "contracts"
SPEC = keccak(text="spec")
CONTEXT = keccak(text="context")
PRIVACY = {
    "epsilon_micros": 3_976_000,
    "budget_micros": 8_000_000,
    "min_cohort": 2,
}  # the demo's figures


@dataclass(frozen=True)
class Roles:
    """One client per role, each signing with its own key, as in a real deployment."""

    admin: ChainClient
    owner: ChainClient
    aggregator: ChainClient
    device: ChainClient
    auditor: ChainClient
    owner_account: LocalAccount
    aggregator_account: LocalAccount
    device_account: LocalAccount


@pytest.fixture(scope="module")
def chain() -> EmbeddedChain:
    return EmbeddedChain()


@pytest.fixture(scope="module")
def roles(chain: EmbeddedChain) -> Roles:
    w3 = chain.web3()
    admin_account = chain.new_account()
    owner_account = chain.new_account()
    aggregator_account = chain.new_account()
    device_account = chain.new_account()
    admin = ChainClient.deploy(w3, admin_account, chain.lock)
    return Roles(
        admin=admin,
        owner=ChainClient.at(w3, admin.address, owner_account, chain.lock),
        aggregator=ChainClient.at(w3, admin.address, aggregator_account, chain.lock),
        device=ChainClient.at(w3, admin.address, device_account, chain.lock),
        auditor=ChainClient.at(w3, admin.address, None, chain.lock),
        owner_account=owner_account,
        aggregator_account=aggregator_account,
        device_account=device_account,
    )


def new_task(roles: Roles, name: str, rounds: int = 3) -> bytes:
    task_id = keccak(text=name)
    roles.owner.create_task(
        task_id, SPEC, CONTEXT, roles.aggregator_account.address, rounds, **PRIVACY
    )
    return task_id


def gas_used(chain: EmbeddedChain, tx_hash: str) -> int:
    return int(chain.web3().eth.get_transaction_receipt(HexStr(tx_hash))["gasUsed"])


# --- device registry -----------------------------------------------------------------------


def test_admin_registers_a_device(roles: Roles, chain: EmbeddedChain) -> None:
    # Prepare
    device = chain.new_account(0).address
    assert not roles.auditor.is_device(device)

    # Execute
    tx_hash = roles.admin.register_device(device)

    # Assert
    assert tx_hash.startswith("0x") and len(tx_hash) == 66
    assert roles.auditor.is_device(device)


def test_only_a_registrar_registers_devices(roles: Roles, chain: EmbeddedChain) -> None:
    # Prepare
    device = chain.new_account(0).address

    # Execute / Assert
    with pytest.raises(ChainError, match="AccessControlUnauthorizedAccount"):
        roles.device.register_device(device)
    assert not roles.auditor.is_device(device)


def test_a_device_is_registered_once(roles: Roles, chain: EmbeddedChain) -> None:
    # Prepare
    device = chain.new_account(0).address
    roles.admin.register_device(device)

    # Execute / Assert
    with pytest.raises(ChainError, match="DeviceAlreadyRegistered"):
        roles.admin.register_device(device)


def test_threads_sharing_the_chain_lock_do_not_clash(roles: Roles, chain: EmbeddedChain) -> None:
    # Prepare: devices, aggregator and owner run as threads of one process in the simulator
    devices = [[chain.new_account(0).address for _ in range(3)] for _ in range(4)]

    def register(batch: list[str]) -> None:
        for device in batch:
            roles.admin.register_device(device)

    # Execute
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        list(pool.map(register, devices))

    # Assert: every transaction got its own nonce and none was lost
    assert all(roles.auditor.is_device(d) for batch in devices for d in batch)


def test_the_contract_knows_its_deployment_block(chain: EmbeddedChain) -> None:
    # Prepare: a few blocks first, so the deployment block is not a coincidental 0 or 1
    w3 = chain.web3()
    for _ in range(3):
        chain.new_account(0)
    admin = chain.new_account()

    # Execute
    client = ChainClient.deploy(w3, admin, chain.lock)

    # Assert: the block of the deployment transaction, read by a keyless client
    logs = w3.eth.get_logs({"address": client.address, "fromBlock": 0})
    deployed_in = {log["blockNumber"] for log in logs}  # the constructor's RoleGranted events
    assert ChainClient.at(w3, client.address).deployment_block() == deployed_in.pop()
    assert not deployed_in
    assert client.deployment_block() > 3


def test_the_runtime_code_is_the_artifact_byte_for_byte(roles: Roles, chain: EmbeddedChain) -> None:
    # No immutables: what an auditor reads at the address is the compiled deployedBytecode
    code = chain.web3().eth.get_code(roles.admin.address)

    assert "0x" + bytes(code).hex() == load_artifact("Truscl")["deployedBytecode"]


def test_a_read_only_client_cannot_transact(roles: Roles) -> None:
    with pytest.raises(ChainError, match="read-only"):
        roles.auditor.register_device(roles.device_account.address)


# --- tasks ---------------------------------------------------------------------------------


def test_create_task_records_the_terms_and_the_owner(roles: Roles) -> None:
    # Prepare
    task_id = keccak(text="terms")

    # Execute
    roles.owner.create_task(task_id, SPEC, CONTEXT, roles.aggregator_account.address, 5, **PRIVACY)

    # Assert
    task = roles.auditor.task(task_id)
    assert task.task_id == task_id
    assert task.owner == roles.owner_account.address
    assert task.aggregator == roles.aggregator_account.address
    assert (task.spec_hash, task.context_hash) == (SPEC, CONTEXT)
    assert (task.rounds, task.rounds_anchored) == (5, 0)
    assert (task.epsilon_micros, task.epsilon_budget_micros) == (3_976_000, 8_000_000)


def test_a_task_whose_rounds_exceed_its_budget_is_refused(roles: Roles) -> None:
    task_id = keccak(text="over budget")

    with pytest.raises(ChainError, match="BudgetExceeded") as refused:
        roles.owner.create_task(
            task_id,
            SPEC,
            CONTEXT,
            roles.aggregator_account.address,
            12,
            epsilon_micros=8_000_001,
            budget_micros=8_000_000,
            min_cohort=2,
        )

    assert "epsilonMicros=8000001" in str(refused.value)
    with pytest.raises(ChainError, match="UnknownTask"):
        roles.auditor.task(task_id)


def test_a_task_id_cannot_be_reused(roles: Roles) -> None:
    # Prepare
    task_id = new_task(roles, "reused")

    # Execute / Assert: not even by someone else, who would take over the task
    with pytest.raises(ChainError, match="TaskExists"):
        roles.device.create_task(
            task_id, SPEC, CONTEXT, roles.aggregator_account.address, 1, **PRIVACY
        )
    assert roles.auditor.task(task_id).owner == roles.owner_account.address


@pytest.mark.parametrize(
    ("spec", "rounds", "error"),
    [(SPEC, 0, "NoRounds"), (bytes(32), 1, "ZeroHash")],
)
def test_create_task_rejects_empty_terms(
    roles: Roles, spec: bytes, rounds: int, error: str
) -> None:
    with pytest.raises(ChainError, match=error):
        roles.owner.create_task(
            keccak(text=f"empty-{error}"),
            spec,
            CONTEXT,
            roles.aggregator_account.address,
            rounds,
            **PRIVACY,
        )


def test_an_unknown_task_is_an_error(roles: Roles) -> None:
    with pytest.raises(ChainError, match="UnknownTask"):
        roles.auditor.task(keccak(text="never created"))


# --- round anchors -------------------------------------------------------------------------


def test_the_aggregator_anchors_a_round(roles: Roles) -> None:
    # Prepare
    task_id = new_task(roles, "anchor")
    root, aggregate = keccak(text="root"), keccak(text="aggregate")
    assert roles.auditor.round_anchor(task_id, 1) is None

    # Execute
    tx_hash = roles.aggregator.anchor_round(task_id, 1, root, aggregate, 7)

    # Assert
    anchor = roles.auditor.round_anchor(task_id, 1)
    assert isinstance(anchor, RoundAnchor)
    assert (anchor.updates_root, anchor.aggregate_hash, anchor.updates) == (root, aggregate, 7)
    assert anchor.block_number > 0
    assert roles.auditor.anchor_tx(task_id, 1) == tx_hash
    assert roles.auditor.anchor_tx(task_id, 2) is None
    assert roles.auditor.task(task_id).rounds_anchored == 1


@pytest.mark.parametrize("who", ["owner", "device"])
def test_only_the_aggregator_anchors(roles: Roles, who: str) -> None:
    # Prepare
    task_id = new_task(roles, f"anchor-by-{who}")

    # Execute / Assert
    with pytest.raises(ChainError, match="NotAggregator"):
        getattr(roles, who).anchor_round(task_id, 1, keccak(b"r"), keccak(b"a"), 1)
    assert roles.auditor.round_anchor(task_id, 1) is None


def test_rounds_are_anchored_in_order(roles: Roles) -> None:
    # Prepare
    task_id = new_task(roles, "in order", rounds=3)

    # Execute / Assert
    with pytest.raises(ChainError, match="RoundNotNext"):
        roles.aggregator.anchor_round(task_id, 2, keccak(b"r"), keccak(b"a"), 1)
    roles.aggregator.anchor_round(task_id, 1, keccak(b"r1"), keccak(b"a1"), 1)
    with pytest.raises(ChainError, match="RoundNotNext"):
        roles.aggregator.anchor_round(task_id, 3, keccak(b"r"), keccak(b"a"), 1)
    roles.aggregator.anchor_round(task_id, 2, keccak(b"r2"), keccak(b"a2"), 1)
    assert roles.auditor.task(task_id).rounds_anchored == 2


def test_a_round_is_never_anchored_twice(roles: Roles) -> None:
    # Prepare
    task_id = new_task(roles, "twice")
    roles.aggregator.anchor_round(task_id, 1, keccak(b"first"), keccak(b"a"), 3)

    # Execute / Assert: a retried or forged anchor cannot rewrite the round
    with pytest.raises(ChainError, match="RoundAlreadyAnchored"):
        roles.aggregator.anchor_round(task_id, 1, keccak(b"second"), keccak(b"a"), 4)
    anchor = roles.auditor.round_anchor(task_id, 1)
    assert anchor is not None and anchor.updates_root == keccak(b"first")


@pytest.mark.parametrize("round_", [0, 3])
def test_rounds_outside_the_task_are_refused(roles: Roles, round_: int) -> None:
    # Prepare
    task_id = new_task(roles, f"out of range {round_}", rounds=2)
    roles.aggregator.anchor_round(task_id, 1, keccak(b"r1"), keccak(b"a1"), 1)
    roles.aggregator.anchor_round(task_id, 2, keccak(b"r2"), keccak(b"a2"), 1)

    # Execute / Assert
    with pytest.raises(ChainError, match="RoundOutOfRange"):
        roles.aggregator.anchor_round(task_id, round_, keccak(b"r"), keccak(b"a"), 1)


# --- global model --------------------------------------------------------------------------


def test_model_publishing_follows_the_anchors(roles: Roles) -> None:
    # Prepare
    task_id = new_task(roles, "models", rounds=2)
    initial, after_one = keccak(b"model 0"), keccak(b"model 1")

    # Execute / Assert: the initial model right after the task, round 1 only once anchored
    roles.owner.publish_model(task_id, 0, initial)
    with pytest.raises(ChainError, match="RoundNotAnchored"):
        roles.owner.publish_model(task_id, 1, after_one)
    roles.aggregator.anchor_round(task_id, 1, keccak(b"r1"), keccak(b"a1"), 2)
    roles.owner.publish_model(task_id, 1, after_one)

    assert roles.auditor.model_hash(task_id, 0) == initial
    assert roles.auditor.model_hash(task_id, 1) == after_one
    assert roles.auditor.model_hash(task_id, 2) is None


def test_a_model_is_published_once_per_round(roles: Roles) -> None:
    # Prepare
    task_id = new_task(roles, "model once")
    roles.owner.publish_model(task_id, 0, keccak(b"m"))

    # Execute / Assert
    with pytest.raises(ChainError, match="ModelAlreadyPublished"):
        roles.owner.publish_model(task_id, 0, keccak(b"other"))
    assert roles.auditor.model_hash(task_id, 0) == keccak(b"m")


@pytest.mark.parametrize("who", ["aggregator", "device"])
def test_only_the_owner_publishes_models(roles: Roles, who: str) -> None:
    # Prepare
    task_id = new_task(roles, f"model by {who}")

    # Execute / Assert
    with pytest.raises(ChainError, match="NotTaskOwner"):
        getattr(roles, who).publish_model(task_id, 0, keccak(b"m"))
    assert roles.auditor.model_hash(task_id, 0) is None


@pytest.mark.parametrize("cohort", [0, 1])
def test_a_task_whose_minimum_cohort_is_below_two_is_refused(roles: Roles, cohort: int) -> None:
    task_id = keccak(text=f"cohort {cohort}")

    with pytest.raises(ChainError, match="CohortTooSmall"):
        roles.owner.create_task(
            task_id,
            SPEC,
            CONTEXT,
            roles.aggregator_account.address,
            2,
            **{**PRIVACY, "min_cohort": cohort},
        )
    with pytest.raises(ChainError, match="UnknownTask"):
        roles.auditor.task(task_id)


def test_the_minimum_cohort_is_a_term_of_the_task(roles: Roles) -> None:
    task_id = keccak(text="cohort 4")
    roles.owner.create_task(
        task_id, SPEC, CONTEXT, roles.aggregator_account.address, 2, **{**PRIVACY, "min_cohort": 4}
    )

    assert roles.auditor.min_cohort(task_id) == 4


# --- refused rounds ------------------------------------------------------------------------


def test_a_refused_round_gets_the_previous_model_only(roles: Roles) -> None:
    # Prepare: round 1 anchored, the owner refuses it (out of bounds)
    task_id = new_task(roles, "refused", rounds=2)
    initial = keccak(b"model 0")
    roles.owner.publish_model(task_id, 0, initial)
    roles.aggregator.anchor_round(task_id, 1, keccak(b"r1"), keccak(b"a1"), 3)

    # Execute
    roles.owner.refuse_round(task_id, 1, 1)

    # Assert: recorded once; a model derived from the round is refused, the previous one is not
    assert roles.auditor.round_refusal(task_id, 1) == 1
    assert roles.auditor.round_refusal(task_id, 2) == 0
    with pytest.raises(ChainError, match="RoundAlreadyRefused"):
        roles.owner.refuse_round(task_id, 1, 2)
    with pytest.raises(ChainError, match="NotPreviousModel"):
        roles.owner.publish_model(task_id, 1, keccak(b"derived from round 1"))
    roles.owner.publish_model(task_id, 1, initial)
    assert roles.auditor.model_hash(task_id, 1) == initial


def test_a_round_is_refused_only_by_its_owner_after_its_anchor_and_before_its_model(
    roles: Roles,
) -> None:
    # Prepare
    task_id = new_task(roles, "refusal rules", rounds=3)
    roles.owner.publish_model(task_id, 0, keccak(b"m0"))
    roles.aggregator.anchor_round(task_id, 1, keccak(b"r1"), keccak(b"a1"), 3)
    roles.owner.publish_model(task_id, 1, keccak(b"m1"))
    roles.aggregator.anchor_round(task_id, 2, keccak(b"r2"), keccak(b"a2"), 3)

    # Execute / Assert
    with pytest.raises(ChainError, match="NotTaskOwner"):
        roles.aggregator.refuse_round(task_id, 2, 1)
    with pytest.raises(ChainError, match="RoundNotAnchored"):
        roles.owner.refuse_round(task_id, 3, 1)
    with pytest.raises(ChainError, match="ModelAlreadyPublished"):
        roles.owner.refuse_round(task_id, 1, 1)
    for reason in (0, 5):
        with pytest.raises(ChainError, match="UnknownRefusal"):
            roles.owner.refuse_round(task_id, 2, reason)
    assert roles.auditor.round_refusal(task_id, 2) == 0


# --- Merkle proofs -------------------------------------------------------------------------

TREE_SIZES = [1, 2, 3, 7, 8]


def records(task_id: bytes, round_: int, n: int) -> list[UpdateRecord]:
    """``n`` updates of one round, from ``n`` different devices."""
    return [
        UpdateRecord(
            task=task_id,
            round=round_,
            device=Account.create().address,
            ciphertext_hash=keccak(text=f"ciphertext {round_}-{i}"),
            context=keccak(b"context"),
            samples=100 + i,
            epsilon_micros=1_500_000 + i,
            data_root=keccak(text=f"readings {round_}-{i}"),
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def anchored_trees(roles: Roles) -> tuple[bytes, dict[int, list[UpdateRecord]]]:
    """One task whose round i holds a tree of TREE_SIZES[i-1] updates."""
    task_id = new_task(roles, "merkle", rounds=len(TREE_SIZES) + 1)
    trees: dict[int, list[UpdateRecord]] = {}
    for round_, size in enumerate(TREE_SIZES, start=1):
        trees[round_] = records(task_id, round_, size)
        root = merkle_root([r.leaf() for r in trees[round_]])
        roles.aggregator.anchor_round(task_id, round_, root, keccak(b"agg"), size)
    return task_id, trees


def test_the_contract_hashes_an_update_to_the_same_leaf_as_python(
    roles: Roles, anchored_trees: tuple[bytes, dict[int, list[UpdateRecord]]]
) -> None:
    _, trees = anchored_trees

    for record in trees[4]:
        assert roles.auditor.update_leaf(record) == record.leaf()


@pytest.mark.parametrize("round_", range(1, len(TREE_SIZES) + 1))
def test_every_update_proves_on_chain(
    roles: Roles, anchored_trees: tuple[bytes, dict[int, list[UpdateRecord]]], round_: int
) -> None:
    # Prepare
    _, trees = anchored_trees
    leaves = [r.leaf() for r in trees[round_]]
    root = merkle_root(leaves)

    for record in trees[round_]:
        # Execute
        proof = merkle_proof(leaves, record.leaf())

        # Assert: the Python verifier and the contract agree
        assert verify_proof(record.leaf(), proof, root)
        assert roles.auditor.verify_update(record, proof)


def test_a_wrong_update_or_proof_does_not_verify(
    roles: Roles, anchored_trees: tuple[bytes, dict[int, list[UpdateRecord]]]
) -> None:
    # Prepare: round 5 holds 8 updates
    _, trees = anchored_trees
    leaves = [r.leaf() for r in trees[5]]
    record = trees[5][0]
    proof = merkle_proof(leaves, record.leaf())

    # Execute / Assert
    assert not roles.auditor.verify_update(record._replace(samples=1), proof)
    assert not roles.auditor.verify_update(record, [*proof[:-1], keccak(b"x")])
    assert not roles.auditor.verify_update(record, proof[:-1])
    assert not roles.auditor.verify_update(record._replace(round=4), proof)  # another root
    assert not roles.auditor.verify_update(record, proof, counted_in=7)  # not its round or next


def test_a_late_update_verifies_in_the_round_that_counted_it(roles: Roles) -> None:
    # Prepare: an update made for round 1, counted in round 2 beside round 2's own updates
    task_id = new_task(roles, "late update", rounds=3)
    first = records(task_id, 1, 3)
    (late,) = records(task_id, 1, 1)
    second = [late, *records(task_id, 2, 2)]
    for round_, tree in ((1, first), (2, second)):
        root = merkle_root([r.leaf() for r in tree])
        roles.aggregator.anchor_round(task_id, round_, root, keccak(b"agg"), len(tree))
    proof = merkle_proof([r.leaf() for r in second], late.leaf())

    # Execute / Assert: round 2's root counts it; its own round's does not; nor any later one
    assert roles.auditor.verify_update(late, proof, counted_in=2)
    assert not roles.auditor.verify_update(late, proof)
    assert not roles.auditor.verify_update(late, proof, counted_in=3)


def test_an_unanchored_round_verifies_nothing(
    roles: Roles, anchored_trees: tuple[bytes, dict[int, list[UpdateRecord]]]
) -> None:
    # Prepare: the last round is not anchored; a one-leaf tree's root is the leaf itself,
    # so an empty proof against a zero root must not pass either
    task_id, _ = anchored_trees
    (record,) = records(task_id, len(TREE_SIZES) + 1, 1)

    # Execute / Assert
    assert not roles.auditor.verify_update(record, [])


# --- gas and the artifact ------------------------------------------------------------------


def test_gas_stays_well_within_the_limits(roles: Roles, chain: EmbeddedChain) -> None:
    # Prepare
    task_id = keccak(text="gas")
    aggregator = roles.aggregator_account.address
    device = chain.new_account(0).address

    # Execute
    used = {
        "createTask": gas_used(
            chain, roles.owner.create_task(task_id, SPEC, CONTEXT, aggregator, 2, **PRIVACY)
        ),
        "registerDevice": gas_used(chain, roles.admin.register_device(device)),
        "anchorRound": gas_used(
            chain, roles.aggregator.anchor_round(task_id, 1, keccak(b"r"), keccak(b"a"), 100)
        ),
        "publishModel": gas_used(chain, roles.owner.publish_model(task_id, 1, keccak(b"m"))),
    }
    roles.aggregator.anchor_round(task_id, 2, keccak(b"r2"), keccak(b"a2"), 100)
    used["refuseRound"] = gas_used(chain, roles.owner.refuse_round(task_id, 2, 1))

    # Assert: a limit leaves room for a costlier chain, but not for a contract that bloated
    print(f"gas used: {used}")
    for name, gas in used.items():
        assert gas <= GAS_LIMITS[name] // 2, (name, gas)


@pytest.mark.slow
def test_committed_artifact_matches_a_fresh_build(tmp_path: Path) -> None:
    # Prepare
    node = shutil.which("node")
    if node is None or not (CONTRACTS_DIR / "node_modules").is_dir():
        pytest.skip("needs node and `npm ci` in contracts/")

    # Execute
    subprocess.run(
        [node, str(CONTRACTS_DIR / "build.mjs"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    # Assert: the whole file, so compiler settings cannot drift either
    fresh = json.loads((tmp_path / "Truscl.json").read_text())
    committed = load_artifact("Truscl")
    assert fresh["abi"] == committed["abi"]
    assert fresh["bytecode"] == committed["bytecode"]
    assert fresh == committed
    assert (tmp_path / "Truscl.json").read_bytes() == (
        CONTRACTS_DIR / "build" / "Truscl.json"
    ).read_bytes()
