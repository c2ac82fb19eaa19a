"""The audit against tampered archives and chains, on the in-process EVM with real signatures
and real CKKS ciphertexts: each test builds an honest task, changes one thing, and checks that
the audit names it (and, for the honest task, that it verifies)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.privacy.ckks import OwnerKeys, context_hash, encrypt, load_context, sum_ciphertexts
from truscl.server.archive import Archive, RoundManifest
from truscl.server.audit import AuditReport, audit_task
from truscl.task import TaskSpec
from truscl.wire import Domain, Update, merkle_root


@dataclass
class World:
    chain: EmbeddedChain
    admin: ChainClient  # deployer and registrar
    owner: ChainClient
    aggregator: ChainClient
    devices: list[LocalAccount]
    spec: TaskSpec
    context: ts.Context
    archive: Archive
    domain: Domain

    def update(self, signer: LocalAccount, round_no: int, claims: str | None = None) -> Update:
        """An update ``signer`` signs; with ``claims``, its device field then names another
        device (a forgery: the signature stays the signer's)."""
        update = Update(
            task=self.spec.task_id,
            round=round_no,
            device=bytes.fromhex(signer.address[2:]),
            ciphertext=encrypt(self.context, np.full(self.spec.n_params, 0.01)),
            context=bytes.fromhex(self.spec.context_hash[2:]),
            samples=10,
            epsilon_micros=1,
            data_root=os.urandom(32),
        ).signed(signer, self.domain)
        return update if claims is None else replace(update, device=bytes.fromhex(claims[2:]))

    def close_round(self, round_no: int, updates: list[Update]) -> RoundManifest:
        """What an honest aggregator does: archive, anchor, write the manifest."""
        ids = [self.archive.put(u.encode(), u.ident) for u in updates]
        root = merkle_root([u.leaf() for u in updates])
        aggregate = sum_ciphertexts(self.context, [u.ciphertext for u in updates], 5)
        tx = self.aggregator.anchor_round(
            self.spec.task_id, round_no, root, keccak(aggregate), len(updates)
        )
        manifest = RoundManifest(
            task=self.spec.task,
            round=round_no,
            updates=tuple(ids),
            root="0x" + root.hex(),
            aggregate=self.archive.put(aggregate),
            aggregate_hash="0x" + keccak(aggregate).hex(),
            anchor_tx=tx,
        )
        self.archive.put_round(manifest)
        return manifest

    def audit(self) -> AuditReport:
        return audit_task(self.chain.client(self.admin.address), self.archive, self.spec.task)

    def manifest_path(self, round_no: int) -> Path:
        return self.archive.root / "rounds" / self.spec.task / f"{round_no}.json"


@pytest.fixture()
def world(tmp_path: Path, owner_keys: OwnerKeys) -> World:
    chain = EmbeddedChain()
    w3 = chain.web3()
    admin = ChainClient.deploy(w3, chain.new_account(), chain.lock)
    owner_account, aggregator_account = chain.new_account(), chain.new_account()
    owner = chain.client(admin.address, owner_account)
    aggregator = chain.client(admin.address, aggregator_account)
    devices = [chain.new_account(0) for _ in range(3)]
    for device in devices[:2]:
        admin.register_device(device.address)
    context_bytes = owner_keys.public_context_bytes()
    spec = occupancy_spec("0x" + context_hash(context_bytes).hex(), rounds=2)
    owner.create_task(
        spec.task_id, spec.hash(), context_hash(context_bytes), aggregator_account.address, 2,
        epsilon_micros=1, budget_micros=8_000_000, min_cohort=2,
    )  # fmt: skip
    archive = Archive(tmp_path / "archive")
    archive.put_task(spec.task, spec.encode(), context_bytes)
    return World(
        chain, admin, owner, aggregator, devices, spec, load_context(context_bytes), archive,
        Domain(admin.chain_id, admin.address),
    )  # fmt: skip


def _honest_round(world: World, round_no: int) -> RoundManifest:
    return world.close_round(round_no, [world.update(d, round_no) for d in world.devices[:2]])


def _all_problems(report: AuditReport) -> str:
    return "\n".join([*report.problems, *(p for r in report.rounds for p in r.problems)])


def test_an_honest_task_verifies(world: World) -> None:
    _honest_round(world, 1)
    _honest_round(world, 2)

    report = world.audit()

    assert report.ok and (report.verified, report.total) == (2, 2), report.as_dict()


def test_a_device_registered_after_the_round_fails_it(world: World) -> None:
    # Prepare: the third device's update is counted in round 1, and it is registered after
    latecomer = world.devices[2]
    world.close_round(1, [world.update(d, 1) for d in world.devices])
    world.admin.register_device(latecomer.address)  # registered now, at the latest block

    report = world.audit()

    assert not report.ok
    (problem,) = report.rounds[0].problems
    assert f"update from {latecomer.address}, which was not registered when the round" in problem


def test_a_manifest_citing_another_transaction_as_its_anchor_fails(world: World) -> None:
    manifest = _honest_round(world, 1)
    other_tx = world.admin.register_device(world.devices[2].address)
    world.archive.put_round(replace(manifest, anchor_tx=other_tx))

    report = world.audit()

    assert not report.ok
    assert "is not the transaction that anchored the round" in report.rounds[0].problems[0]


def test_a_contract_that_is_not_this_releases_code_is_refused_before_any_call(
    world: World,
) -> None:
    # Prepare: a contract whose runtime code is one byte (creation code returns 0x2a)
    _honest_round(world, 1)
    w3 = world.chain.web3()
    tx = w3.eth.send_transaction(
        {"from": w3.eth.accounts[0], "data": "0x602a60005360016000f3", "gas": 100_000}
    )
    impostor = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]

    report = audit_task(world.chain.client(impostor), world.archive, world.spec.task)

    assert not report.ok and report.total == 0
    assert report.problems == (
        f"the code at {impostor} is not this release's Truscl contract "
        f"(code hash 0x{keccak(b'*').hex()[:10]}…, the artifact's "
        + report.problems[0].split("the artifact's ")[1],
    )


def test_an_accepted_update_no_manifest_counts_is_flagged_in_its_round(world: World) -> None:
    # Prepare: the aggregator archived (and so acknowledged) a third update, then left it out
    _honest_round(world, 1)
    world.admin.register_device(world.devices[2].address)
    dropped = world.update(world.devices[2], 1)
    ident = world.archive.put(dropped.encode(), dropped.ident)
    stray = world.archive.put(b"not an update")

    report = world.audit()

    assert not report.ok
    assert report.rounds[0].problems == (
        f"update {ident[:12]}… from {world.devices[2].address} for round 1 is archived but "
        "counted by no manifest",
    )
    assert report.problems == (f"blob {stray[:12]}… is named by no manifest, spec or context",)


def test_an_update_for_a_round_not_anchored_yet_is_a_note_not_a_failure(world: World) -> None:
    _honest_round(world, 1)
    early = world.update(world.devices[0], 2)
    world.archive.put(early.encode(), early.ident)  # round 2 is still open

    report = world.audit()

    assert report.ok, report.as_dict()
    assert len(report.notes) == 1 and "for round 2, not anchored" in report.notes[0]


def test_a_problem_names_the_signer_and_the_device_it_claims(world: World) -> None:
    # Prepare: device 1's key signs an update, whose device field is then changed to device 0
    honest, forger = world.devices[:2]
    forged = world.update(forger, 1, claims=honest.address)
    world.close_round(1, [forged, world.update(forger, 1)])

    report = world.audit()

    # Assert: the recovered signer (whatever key recovers from a signature over other fields)
    # and the claimed device are both named, so the claimed device is not blamed alone
    problems = _all_problems(report)
    signer = forged.signer(world.domain)
    assert signer != honest.address
    assert f"is signed by {signer} but claims device {honest.address}" in problems
    assert problems.count("\n") == 0  # that one problem, no other
    assert "differs from the anchored root" not in problems  # the root is what was anchored


def test_a_deleted_or_unreadable_blob_and_a_malformed_manifest_give_one_clear_line(
    world: World,
) -> None:
    # Prepare: round 1 loses an update blob, round 2's manifest is cut short
    manifest = _honest_round(world, 1)
    _honest_round(world, 2)
    (world.archive.root / "blobs" / manifest.updates[0]).unlink()
    world.manifest_path(2).write_text(world.manifest_path(2).read_text()[:40])

    report = world.audit()

    first, second = report.rounds
    assert first.problems[0] == f"update {manifest.updates[0][:12]}… is missing from the archive"
    assert second.problems == ("the round's manifest is malformed: not JSON",)
    text = json.dumps(report.as_dict())
    assert "Errno" not in text and str(world.archive.root) not in text


@pytest.mark.parametrize(
    "change",
    [
        {"updates": ["../../../etc/passwd"]},
        {"updates": "abc"},
        {"round": "1"},
        {"anchor_tx": None},
        {"extra": 1},
    ],
)
def test_a_manifest_with_wrong_fields_is_malformed_not_a_crash(
    world: World, change: dict[str, object]
) -> None:
    _honest_round(world, 1)
    data = {**json.loads(world.manifest_path(1).read_text()), **change}
    world.manifest_path(1).write_text(json.dumps(data))

    report = world.audit()

    (problem,) = report.rounds[0].problems
    assert problem.startswith("the round's manifest is malformed: ")


def test_a_missing_spec_is_a_task_problem(world: World) -> None:
    _honest_round(world, 1)
    spec_id = (world.archive.root / "rounds" / world.spec.task / "spec").read_text()
    (world.archive.root / "blobs" / spec_id).unlink()

    report = world.audit()

    assert not report.ok
    assert report.problems == ("the task spec is missing from the archive",)
