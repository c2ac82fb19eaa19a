"""Threshold mode as deployed: keygen over a real broker, guardians that refuse what they must,
and an owner that refuses, on chain, a round whose decryption would leak the key.

Every role here is the real one (KeygenBoard, Guardian, TaskOwner, Aggregator) on a real
mosquitto and the in-process EVM; devices are played by signing updates by hand, so that one
of them can send the crafted ciphertext an attacker would.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import zstandard
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.errors import ProtocolError, SignatureError
from truscl.mqtt import MqttLink
from truscl.privacy import ckks, seal_layout
from truscl.privacy.ckks import encrypt, load_ciphertext, load_context, sum_ciphertexts
from truscl.privacy.release import Refusal, noise_slack
from truscl.privacy.threshold import PartialDecryption, combine, profile_of
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.guardian import (
    NOT_THE_ANCHORED_AGGREGATE,
    UNANCHORED,
    UNDER_COHORT,
    Guardian,
    GuardianRecords,
    Refused,
)
from truscl.server.keygen import (
    HolderState,
    KeygenBoard,
    KeygenRecord,
    KeygenTerms,
    audit_keygen,
    await_session,
    publish_session,
    run_keygen_holder,
)
from truscl.server.owner import HeKeys, TaskOwner
from truscl.task import TaskSpec
from truscl.wire import Domain, TaskTopics, Update, envelope, split_update
from truscl.wire.keyholders import PartialMessage

MAX_MESSAGE = 64 * 1024
WAIT = 60.0


@dataclass
class Holders:
    """The outcome of one key generation between the owner and one guardian."""

    chain: EmbeddedChain
    contract: ChainClient
    domain: Domain
    broker: Mosquitto
    task: str
    owner: LocalAccount
    guardian: LocalAccount
    public_context: bytes
    records: dict[str, KeygenRecord]
    states: dict[str, HolderState]

    def spec(self, **terms: object) -> TaskSpec:
        record = self.records["owner"]
        return occupancy_spec(
            "0x" + record.transcript.context_hash.hex(),
            task=self.task,
            key_holders=tuple((n, a.lower()) for n, a in record.terms.holders),
            keygen_digest="0x" + record.transcript.digest().hex(),
            max_message=MAX_MESSAGE,
            **terms,
        )

    def owner_keys(self) -> HeKeys:
        return HeKeys(
            share=self.states["owner"].share("owner", "ckks-4096-60-49"),
            public_context=self.public_context,
            guardians={"guardian-1": self.guardian.address.lower()},
        )

    def guardian_role(self, spec: TaskSpec, folder: Path) -> Guardian:
        record = self.records["guardian-1"]
        return Guardian(
            task=self.task,
            owner=self.owner.address,
            name="guardian-1",
            share=self.states["guardian-1"].share("guardian-1", "ckks-4096-60-49"),
            public_context=self.states["guardian-1"].public_context(),
            keygen_digest=record.transcript.digest(),
            chain=self.contract_for(self.guardian),
            account=self.guardian,
            broker=self.broker.settings,
            records=GuardianRecords(folder),
        )

    def contract_for(self, account: LocalAccount) -> ChainClient:
        return self.chain.client(self.contract.address, account)


def keygen(
    tmp_path: Path, chain: EmbeddedChain, contract: ChainClient, broker: Mosquitto
) -> Holders:
    """The owner and guardian-1 run the protocol concurrently, as two processes would."""
    owner, guardian = chain.new_account(), chain.new_account()
    task = "0x" + keccak(text=str(tmp_path)).hex()
    domain = Domain(contract.chain_id, contract.address)
    terms = KeygenTerms(
        "ckks-4096-60-49",
        (("guardian-1", guardian.address), ("owner", owner.address)),
    )
    states = {name: HolderState(tmp_path / name) for name in ("owner", "guardian-1")}
    results: dict[str, tuple[bytes, KeygenRecord]] = {}
    failures: list[BaseException] = []

    def holder(name: str, account: LocalAccount) -> None:
        try:
            with KeygenBoard(
                task=task, name=name, account=account, domain=domain, broker=broker.settings
            ) as board:
                if name == "owner":
                    publish_session(board, terms)
                    session = terms
                else:
                    session = await_session(board, "owner", owner.address)
                results[name] = run_keygen_holder(board, session, states[name])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [
        threading.Thread(target=holder, args=("guardian-1", guardian)),
        threading.Thread(target=holder, args=("owner", owner)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not failures, failures
    assert results["owner"][0] == results["guardian-1"][0]
    return Holders(
        chain, contract, domain, broker, task, owner, guardian, results["owner"][0],
        {n: r for n, (_, r) in results.items()}, states,
    )  # fmt: skip


@pytest.fixture()
def holders(tmp_path: Path) -> Iterator[Holders]:
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    with Mosquitto(tmp_path / "broker") as broker:
        yield keygen(tmp_path, chain, contract, broker)


# --- key generation ------------------------------------------------------------------------


@pytest.mark.slow
def test_keygen_over_the_broker_gives_one_verifiable_signed_key(holders: Holders) -> None:
    # Assert: both holders archived the same record, anyone can check it from its bytes alone,
    # and a device encrypting under the context is decrypted by both shares together only
    record = holders.records["owner"]
    assert record.encode() == holders.records["guardian-1"].encode()
    archived = KeygenRecord.decode(holders.states["guardian-1"].record_file.read_bytes())
    assert archived.verify(holders.domain) == holders.public_context
    assert record.transcript.verify(holders.public_context) == holders.public_context
    assert (holders.states["owner"].share_file.stat().st_mode & 0o777) == 0o600
    tampered = KeygenRecord(
        record.task, record.terms, record.transcript, tuple(reversed(record.signatures))
    )
    with pytest.raises(SignatureError):
        tampered.verify(holders.domain)

    context = load_context(holders.public_context)
    values = np.array([0.25, -1.5, 3.0, 0.0, 2.0])
    ciphertext = encrypt(context, values)
    shares = [holders.states[n].share(n, "ckks-4096-60-49") for n in ("owner", "guardian-1")]
    partials = [share.partial_decrypt(context, ciphertext, 5) for share in shares]
    result = combine(context, ciphertext, 5, partials, ["owner", "guardian-1"])
    np.testing.assert_allclose(result, values, atol=noise_slack(profile_of(context), 2))


@pytest.mark.slow
def test_a_guardian_joins_only_the_owners_call(holders: Holders, tmp_path: Path) -> None:
    # Prepare: a session for another task "called" by someone who is not the owner
    impostor = Account.create()
    task = "0x" + keccak(text="impostor").hex()
    with KeygenBoard(
        task=task,
        name="owner",
        account=impostor,
        domain=holders.domain,
        broker=holders.broker.settings,
    ) as board:
        publish_session(
            board,
            KeygenTerms("ckks-4096-60-49", (("guardian-1", holders.guardian.address),
                                            ("owner", impostor.address))),
        )  # fmt: skip
        # Execute / Assert: the guardian checks the call against the owner it was told of
        with (
            KeygenBoard(
                task=task,
                name="guardian-1",
                account=holders.guardian,
                domain=holders.domain,
                broker=holders.broker.settings,
                timeout=10,
            ) as guardian,
            pytest.raises(SignatureError),
        ):
            await_session(guardian, "owner", holders.owner.address)


@pytest.mark.slow
def test_an_auditor_checks_the_key_against_the_chain_and_the_spec(served: Served) -> None:
    s = served
    record = s.holders.records["guardian-1"]
    task = s.owner_chain.task(s.spec.task_id)

    assert audit_keygen(record, s.spec, task, s.holders.domain) == s.holders.public_context
    other_digest = replace(s.spec, keygen_digest="0x" + "00" * 32)
    with pytest.raises(ProtocolError, match="the spec is not the task's anchored spec"):
        audit_keygen(record, other_digest, task, s.holders.domain)
    fewer = replace(task, context_hash=b"\x00" * 32)
    with pytest.raises(ProtocolError, match="context on chain is not the transcript's"):
        audit_keygen(record, s.spec, fewer, s.holders.domain)


# --- the guardian's refusals ---------------------------------------------------------------


@dataclass
class Served:
    holders: Holders
    spec: TaskSpec
    guardian: Guardian
    owner_chain: ChainClient
    aggregator_chain: ChainClient
    context: ts.Context


@pytest.fixture()
def served(holders: Holders, tmp_path: Path) -> Served:
    """A task created on chain with the threshold spec, and guardian-1's role (not started:
    the tests hand it requests directly, as its worker would)."""
    spec = holders.spec(rounds=3, quorum=2, min_cohort=3)
    owner_chain = holders.contract_for(holders.owner)
    aggregator = holders.chain.new_account()
    owner_chain.create_task(
        spec.task_id, spec.hash(), bytes.fromhex(spec.context_hash[2:]), aggregator.address,
        spec.rounds, epsilon_micros=1, budget_micros=1, min_cohort=spec.min_cohort,
    )  # fmt: skip
    guardian = holders.guardian_role(spec, tmp_path / "guardian-records")
    guardian.accept_spec(spec)
    return Served(
        holders, spec, guardian, owner_chain, holders.contract_for(aggregator),
        load_context(holders.public_context),
    )  # fmt: skip


def aggregate_message(round_no: int, ciphertext: bytes, updates: int) -> bytes:
    return envelope.encode(
        "aggregate",
        round=round_no,
        ciphertext=ciphertext,
        updates=updates,
        samples=10 * updates,
        root=b"\x01" * 32,
        anchor_tx="0x" + "00" * 32,
    )


@pytest.mark.slow
def test_a_guardian_decrypts_only_an_anchored_aggregate_of_the_cohort_once(
    served: Served,
) -> None:
    # Prepare: three devices' updates, their sum anchored for round 1
    s = served
    values = [np.full(5, 0.1 * (i + 1)) for i in range(3)]
    updates = [encrypt(s.context, v) for v in values]
    aggregate = sum_ciphertexts(s.context, updates, 5)
    individual = updates[0]

    # Execute / Assert: one device's update, before and after the round is anchored
    with pytest.raises(Refused) as before:
        s.guardian.answer(aggregate_message(1, individual, 1))
    s.aggregator_chain.anchor_round(s.spec.task_id, 1, keccak(b"root"), keccak(aggregate), 3)
    with pytest.raises(Refused) as individually:
        s.guardian.answer(aggregate_message(1, individual, 3))
    answer = PartialMessage.decode(s.guardian.answer(aggregate_message(1, aggregate, 3)))
    again = s.guardian.answer(aggregate_message(1, aggregate, 3))  # the aggregator repeating it
    s.owner_chain.publish_model(s.spec.task_id, 0, keccak(b"m0"))
    s.owner_chain.publish_model(s.spec.task_id, 1, keccak(b"m1"))
    s.aggregator_chain.anchor_round(s.spec.task_id, 2, keccak(b"r2"), keccak(individual), 1)
    with pytest.raises(Refused) as under:
        s.guardian.answer(aggregate_message(2, individual, 1))

    # Assert: the reasons, counted durably; the one answer is signed and recorded, and with
    # the owner's partial it decrypts the sum within the stated error
    assert [e.value.reason for e in (before, individually, under)] == [
        UNANCHORED, NOT_THE_ANCHORED_AGGREGATE, UNDER_COHORT,
    ]  # fmt: skip
    assert GuardianRecords(s.guardian.records.folder.parent).refusals() == {
        UNANCHORED: 1, NOT_THE_ANCHORED_AGGREGATE: 1, UNDER_COHORT: 1,
    }  # fmt: skip
    assert again == answer.encode()  # asked again: the recorded answer, not a new decryption
    answer.verify(s.holders.domain, s.holders.guardian.address)
    assert (answer.round, answer.aggregate) == (1, keccak(aggregate))
    assert s.guardian.records.answered(1) == answer.encode()
    assert s.guardian.records.answered(2) is None
    owner_share = s.holders.states["owner"].share("owner", "ckks-4096-60-49")
    own = owner_share.partial_decrypt(s.context, aggregate, 5)
    total = combine(
        s.context, aggregate, 5, [own, PartialDecryption.from_bytes(answer.partial)],
        ["owner", "guardian-1"],
    )  # fmt: skip
    np.testing.assert_allclose(total, sum(values), atol=noise_slack(profile_of(s.context), 2))


@pytest.mark.slow
def test_the_owners_share_alone_tells_nothing_of_an_individual_update(served: Served) -> None:
    # The guardian refuses (above); what the owner can do alone with its share and c0 is
    # uncorrelated with the plaintext: k - 1 = 1 holder of 2.
    s = served
    share = s.holders.states["owner"].share("owner", "ckks-4096-60-49")
    rng = np.random.default_rng(5)
    plain = rng.uniform(-1, 1, size=(4, 2048))  # 8,192 values: correlation's sd ~0.011
    guesses = []
    for values in plain:
        ciphertext = encrypt(s.context, values)
        partial = share.partial_decrypt(s.context, ciphertext, values.size)
        guesses.append(  # one holder short
            combine(s.context, ciphertext, values.size, [partial], ["owner"])
        )
    correlation = np.corrcoef(plain.reshape(-1), np.asarray(guesses).reshape(-1))[0, 1]
    assert abs(correlation) < 0.1  # ~9 standard deviations
    assert np.median(np.abs(np.asarray(guesses))) > 1e3  # noise far above the data's scale


# --- the crafted ciphertext ----------------------------------------------------------------


def uncompressed_ciphertext(context: ts.Context, values: np.ndarray) -> bytearray:
    """An honest encryption of ``values`` (one ciphertext) as SEAL saves it uncompressed."""
    (saved,) = ckks.unpack_vector(encrypt(context, values))[1]
    header, body = bytearray(saved[:16]), saved[16:]
    if header[5] != 0:
        body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 24)
    header[5] = 0  # compression: none
    header[8:16] = struct.pack("<Q", 16 + len(body))
    return bytearray(bytes(header) + body)


def crafted_ciphertext(context: ts.Context, values: np.ndarray, offset: int = 2**57) -> bytes:
    """An honest encryption of ``values`` with ``offset`` added to its second polynomial.

    Added to every NTT residue of c1, which is adding the constant polynomial ``offset`` to c1:
    the decryption becomes ``m + offset * s``, the secret key scaled up. Rebuilt by hand:
    SEAL's ciphertext, uncompressed, in truscl's vector.
    """
    raw = uncompressed_ciphertext(context, values)
    ciphertext = seal_layout.load_seal_ciphertext(context, bytes(raw))
    start = 16 + struct.calcsize("<4QBQQQdQ") + 16  # SEAL header, metadata, DynArray header
    (count,) = struct.unpack_from("<Q", raw, start)
    polys = seal_layout.ciphertext_polys(ciphertext)
    words = np.frombuffer(bytes(raw[start + 8 : start + 8 + 8 * count]), dtype="<u8")
    assert count == polys.size and np.array_equal(words.reshape(polys.shape), polys)
    edited = polys.copy()
    for j, q in enumerate(seal_layout.first_level(context).moduli):
        edited[1, j] = ((edited[1, j].astype(object) + offset) % q).astype(np.uint64)
    raw[start + 8 : start + 8 + 8 * count] = edited.astype("<u8").tobytes()
    return ckks.pack_vector(len(values), [bytes(raw)])


@pytest.mark.slow
def test_a_crafted_round_is_refused_on_chain_and_the_task_goes_on(
    holders: Holders, tmp_path: Path
) -> None:
    # Prepare: the whole threshold deployment, in process; three registered devices
    spec = holders.spec(rounds=3, quorum=3, round_seconds=120)
    owner_chain = holders.contract_for(holders.owner)
    devices = [Account.create() for _ in range(3)]
    for device in devices:
        holders.contract.register_device(device.address)
    aggregator_account = holders.chain.new_account()
    released: queue.Queue[int] = queue.Queue()
    owner = TaskOwner(
        keys=holders.owner_keys(),
        chain=owner_chain,
        broker=holders.broker.settings,
        on_model=lambda round_no, _: released.put(round_no),
    )
    aggregator = Aggregator(
        spec=spec,
        public_context=holders.public_context,
        chain=holders.contract_for(aggregator_account),
        archive=Archive(tmp_path / "archive"),
        broker=holders.broker.settings,
        expected=3,
    )
    guardian = holders.guardian_role(spec, tmp_path / "guardian-state")
    context = load_context(holders.public_context)
    topics = TaskTopics(spec.task)
    announced: queue.Queue[int] = queue.Queue()
    link = MqttLink(
        "devices",
        holders.broker.settings,
        lambda _, payload: announced.put(envelope.decode(payload, "round", 1024)["round"]),
        [TaskTopics(spec.task).round],
        MAX_MESSAGE,
    )
    evil = crafted_ciphertext(context, np.full(5, 0.5))
    load_ciphertext(context, evil, 5)  # well-formed: the aggregator's checks cannot tell

    def send(round_no: int, device: LocalAccount, ciphertext: bytes) -> None:
        update = Update(
            task=spec.task_id,
            round=round_no,
            device=bytes.fromhex(device.address[2:]),
            ciphertext=ciphertext,
            context=bytes.fromhex(spec.context_hash[2:]),
            samples=10,
            epsilon_micros=1,
            data_root=b"\x01" * 32,
        ).signed(device, holders.domain)
        for chunk in split_update(update, MAX_MESSAGE):
            link.publish(topics.updates(device.address), chunk)

    owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
    guardian.start()
    aggregator.start()
    link.start()
    try:
        assert released.get(timeout=WAIT) == 0
        # Execute: an honest round, then one with the crafted update, then an honest one
        for round_no in (1, 2, 3):
            while announced.get(timeout=WAIT) != round_no:  # devices answer the open round
                continue
            for index, device in enumerate(devices):
                crafted = round_no == 2 and index == 0
                send(round_no, device, evil if crafted else encrypt(context, np.full(5, 0.5)))
            assert released.get(timeout=WAIT) == round_no
    finally:
        link.close()
        aggregator.stop()
        guardian.stop()
        owner.stop()

    # Assert: round 2 counted all three updates, was refused on chain, and its "model" is
    # model 1 again (the contract would take nothing else); rounds 1 and 3 moved the model
    task = spec.task_id
    reader = holders.contract_for(holders.chain.new_account())
    assert reader.round_anchor(task, 2) is not None and reader.round_anchor(task, 2).updates == 3
    assert [reader.round_refusal(task, r) for r in (1, 2, 3)] == [0, Refusal.OUT_OF_BOUNDS, 0]
    models = owner.models
    np.testing.assert_array_equal(models[2], models[1])
    assert reader.model_hash(task, 2) == reader.model_hash(task, 1)
    np.testing.assert_allclose(models[1], np.full(5, 0.5), atol=1e-3)
    np.testing.assert_allclose(models[3], np.full(5, 1.0), atol=1e-3)
    assert owner.refusals == {"out_of_bounds": 1}
    assert sorted(guardian.records.folder.glob("*.cbor")) == [
        guardian.records.folder / f"{r}.cbor" for r in (1, 2, 3)
    ]


@pytest.mark.slow
def test_a_partial_from_an_unknown_holder_is_not_taken(holders: Holders) -> None:
    # A signed partial is bound to its holder: under another name its signature fails
    message = PartialMessage(
        bytes.fromhex(holders.task[2:]), 1, "guardian-1", b"\x02" * 32, b"partial"
    ).signed(holders.guardian, holders.domain)
    forged = PartialMessage(
        message.task, 1, "guardian-2", message.aggregate, message.partial, message.signature
    )
    forged_round = PartialMessage(
        message.task, 2, "guardian-1", message.aggregate, message.partial, message.signature
    )
    message.verify(holders.domain, holders.guardian.address)
    for bad in (forged, forged_round):
        with pytest.raises(SignatureError):
            bad.verify(holders.domain, holders.guardian.address)
    with pytest.raises(ProtocolError):
        PartialMessage.decode(message.encode()[:-3])


@pytest.mark.slow
def test_the_owner_refuses_an_under_cohort_round_on_chain(holders: Holders) -> None:
    # Prepare: a task whose minimum cohort is 3; the "aggregator" anchors a round of 2
    spec = holders.spec(rounds=2, quorum=2, min_cohort=3)
    aggregator = holders.chain.new_account()
    released: queue.Queue[int] = queue.Queue()
    owner = TaskOwner(
        keys=holders.owner_keys(),
        chain=holders.contract_for(holders.owner),
        broker=holders.broker.settings,
        on_model=lambda round_no, _: released.put(round_no),
    )
    context = load_context(holders.public_context)
    aggregate = sum_ciphertexts(context, [encrypt(context, np.full(5, 0.5))] * 2, 5)
    owner.create_task(spec, aggregator.address, np.zeros(spec.n_params))
    try:
        assert released.get(timeout=WAIT) == 0
        holders.contract_for(aggregator).anchor_round(
            spec.task_id, 1, keccak(b"root"), keccak(aggregate), 2
        )
        with MqttLink(
            "aggregator", holders.broker.settings, lambda t, p: None, [], MAX_MESSAGE
        ) as link:
            link.publish_blob(TaskTopics(spec.task).aggregate, aggregate_message(1, aggregate, 2))
        # Execute: the owner refuses without asking any guardian, and the task goes on
        assert released.get(timeout=WAIT) == 1
    finally:
        owner.stop()

    # Assert
    reader = holders.contract_for(holders.chain.new_account())
    assert reader.round_refusal(spec.task_id, 1) == Refusal.UNDER_COHORT
    assert reader.model_hash(spec.task_id, 1) == reader.model_hash(spec.task_id, 0)
    assert owner.refusals == {"under_cohort": 1}
