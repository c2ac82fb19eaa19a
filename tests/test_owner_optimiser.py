"""The owner's server optimiser across a restart and a refused round, on a real broker, the
in-process EVM, a real aggregator and real CKKS: what the owner releases is exactly what one
that never stopped computes, and a refused round leaves the optimiser's state as it was.

The aggregator's deadlines run on a clock the test holds, moved only once the update it waits
for has its receipt, so no step races the wall clock.
"""

from __future__ import annotations

import queue
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from test_aggregator_rounds import WAIT_S, Clock, Devices

from truscl.broker import Mosquitto
from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.keyfile import read_secret
from truscl.learning import OptimiserState, OptimiserTerms
from truscl.privacy.ckks import OwnerKeys, encrypt, load_context
from truscl.privacy.threshold import PartialDecryption, combine_slots
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.config import OWNER_HOLDER
from truscl.server.owner import ModelStore, TaskOwner, next_model
from truscl.wire import Domain, Update
from truscl.wire.model import model_hash

pytestmark = pytest.mark.slow
FEDADAM = OptimiserTerms("fedadam", learning_rate=0.5, beta1=0.5, beta2=0.75, tau=0.1)
# Each device's delta per round
SENT = {
    1: [np.array([0.5, -0.25, 0.125, 1.0, -0.5]), np.array([0.25, -0.5, 0.375, 0.5, 0.0])],
    2: [np.array([1.0, 1.0, 1.0, 1.0, 1.0])],  # alone: under the cohort, refused
    3: [np.array([-0.25, 0.5, 0.25, -0.5, 0.75]), np.array([0.5, 0.25, -0.125, 0.0, 0.25])],
}


def released(models: queue.Queue[int], round_no: int) -> None:
    while models.get(timeout=WAIT_S) != round_no:
        continue


def test_a_restarted_owner_releases_what_an_uninterrupted_one_would(
    tmp_path: Path, owner_keys: OwnerKeys
) -> None:
    # Prepare: a 3-round FedAdam task; rounds close at their deadline with one update (quorum)
    # but need two to be decrypted (min_cohort)
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    devices = [Account.create() for _ in range(2)]
    for device in devices:
        contract.register_device(device.address)
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    owner_account, aggregator_account = chain.new_account(), chain.new_account()
    models: queue.Queue[int] = queue.Queue()

    def start_owner() -> TaskOwner:
        return TaskOwner(
            keys=owner_keys,
            chain=chain.client(contract.address, owner_account),
            broker=broker.settings,
            store=ModelStore(tmp_path / "models"),
            on_model=lambda round_no, _: models.put(round_no),
        )

    owner = start_owner()
    spec = occupancy_spec(
        owner.context_hash, rounds=3, quorum=1, round_seconds=60, optimiser=FEDADAM
    )
    clock = Clock()
    aggregator = Aggregator(
        spec=spec,
        public_context=owner.public_context,
        chain=chain.client(contract.address, aggregator_account),
        archive=Archive(tmp_path / "archive"),
        broker=broker.settings,
        expected=2,
        clock=clock,
    )
    context = load_context(owner.public_context)
    domain = Domain(contract.chain_id, contract.address)

    def update(device: LocalAccount, round_no: int, delta: np.ndarray) -> Update:
        return Update(
            task=spec.task_id,
            round=round_no,
            device=bytes.fromhex(device.address[2:]),
            ciphertext=encrypt(context, delta),
            context=bytes.fromhex(spec.context_hash[2:]),
            samples=10,
            epsilon_micros=1,
            data_root=b"\x01" * 32,
        ).signed(device, domain)

    def decrypted(round_no: int) -> np.ndarray:
        archive = Archive(tmp_path / "archive")
        own = read_secret(ModelStore(tmp_path / "models").partial_path(round_no))
        slots = combine_slots(
            context,
            archive.get(archive.round(spec.task, round_no).aggregate),
            spec.n_params,
            [PartialDecryption.from_bytes(own)],
            [OWNER_HOLDER],
        )
        return slots.reshape(-1)[: spec.n_params]

    owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
    aggregator.start()
    fleet = Devices(SimpleNamespace(spec=spec, broker=broker))  # type: ignore[arg-type]
    try:
        # Execute: round 1 from both devices, then the owner stops and another takes over
        for round_no in (1, 2, 3):
            fleet.wait_round(round_no)
            for device, delta in zip(devices, SENT[round_no], strict=False):
                assert fleet.send(device, update(device, round_no, delta)).accepted
            if len(SENT[round_no]) < len(devices):
                clock.now += spec.round_seconds + 1  # the round closes at its deadline
            released(models, round_no)
            if round_no == 1:
                owner.stop()
                owner = start_owner()
                owner.resume(spec)
    finally:
        fleet.close()
        aggregator.stop()
        owner.stop()
        broker.stop()

    # Assert: the uninterrupted sequence, stepped by the owner's own function from the sums it
    # decrypted (its kept partial decryption of each round's archived aggregate)
    store = ModelStore(tmp_path / "models")
    m1, s1 = next_model(spec, np.zeros(spec.n_params), OptimiserState(), decrypted(1), 2)
    m3, s3 = next_model(spec, m1, s1, decrypted(3), 2)
    stored = store.all(spec.n_params)
    assert sorted(stored) == [0, 1, 2, 3]
    assert np.array_equal(stored[1], m1)
    assert np.array_equal(stored[2], m1) and contract.round_refusal(spec.task_id, 2) != 0
    assert store.state(2).to_bytes() == s1.to_bytes()  # the refusal took no step
    assert np.array_equal(stored[3], m3) and store.state(3).to_bytes() == s3.to_bytes()
    assert contract.model_hash(spec.task_id, 3) == model_hash(m3)
    # an owner that had lost its state, or stepped on the refused round, would differ
    forgetful, _ = next_model(spec, m1, OptimiserState(), decrypted(3), 2)
    _, stepped = next_model(spec, m1, s1, np.zeros(spec.n_params), 2)
    assert not np.array_equal(forgetful, m3)
    assert not np.array_equal(next_model(spec, m1, stepped, decrypted(3), 2)[0], m3)
    assert np.allclose(decrypted(3), sum(SENT[3]), atol=1e-3)  # and it is the devices' sum
