"""A device believes the chain, not the broker: forged task terms, keys or models are refused."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import task_owner

from truscl.agent.device import DeviceAgent
from truscl.agent.outbox import Outbox
from truscl.agent.sensors import SensorSuite
from truscl.broker import Mosquitto
from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.hashing import keccak
from truscl.mqtt import MqttLink
from truscl.privacy.ckks import OwnerKeys
from truscl.sim.fleet import make_fleet
from truscl.task import DpTerms
from truscl.wire import TaskTopics, envelope
from truscl.wire.model import model_bytes, model_hash

pytestmark = pytest.mark.slow


def simulated_device(
    chain: EmbeddedChain, contract: ChainClient, task: str, broker: Mosquitto, workdir: Path
) -> tuple[DeviceAgent, SensorSuite]:
    """An agent of ``task`` on a simulated board (its sensors: close them after the agent)."""
    (device,) = make_fleet(1, seed=3)
    suite = SensorSuite(device.pin_factory, device.i2c_bus)
    agent = DeviceAgent(
        account=chain.new_account(),
        task=task,
        chain=chain.client(contract.address),
        broker=broker.settings,
        workdir=workdir,
        collect=lambda: [suite.read(device.now)],
    )
    return agent, suite


def test_forged_spec_context_and_model_are_refused(
    tmp_path: Path, owner_keys: OwnerKeys, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a real task on chain, then a rogue client replaces every retained message
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    aggregator_account = chain.new_account()
    caplog.set_level(logging.WARNING, logger="truscl.agent.device")
    with Mosquitto(tmp_path / "broker") as broker:
        owner = task_owner(chain, contract.address, owner_keys, broker)
        spec = occupancy_spec(
            owner.context_hash,
            rounds=2,
            quorum=1,
        )
        owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
        topics = TaskTopics(spec.task)
        greedy = replace(spec, dp=DpTerms(epsilon_budget=1000.0))
        rogue_model = np.full(spec.n_params, 3.0)
        with MqttLink("rogue", broker.settings, lambda t, p: None, []) as rogue:
            rogue.publish(topics.spec, envelope.encode("spec", spec=greedy.to_dict()), retain=True)
            rogue.publish_retained_blob(topics.context, OwnerKeys.generate().public_context_bytes())
            rogue.publish(
                topics.model,
                envelope.encode(
                    "model",
                    round=0,
                    params=model_bytes(rogue_model),
                    model_hash=model_hash(rogue_model),
                ),
                retain=True,
            )
            agent, suite = simulated_device(chain, contract, spec.task, broker, tmp_path / "device")
            # Execute
            agent.start()
            refusals = (
                "task spec does not match",
                "HE context does not match",
                "model 0 is not the one anchored",
            )

            def all_refused() -> bool:
                logged = "\n".join(r.getMessage() for r in caplog.records)
                return all(refusal in logged for refusal in refusals)

            deadline = time.monotonic() + 120  # a bound for a failure only: the wait ends on
            while not all_refused() and time.monotonic() < deadline:  # the three refusals
                time.sleep(0.05)
            agent.stop()
            suite.close()
        owner.stop()
    # Assert
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "task spec does not match its on-chain hash" in logged
    assert "HE context does not match its on-chain hash" in logged
    assert "model 0 is not the one anchored on chain" in logged
    state = Outbox(tmp_path / "device" / "outbox.sqlite")
    assert all(s.ledger_index is None for s in state.rounds())  # no round charged
    state.close()
    assert not (tmp_path / "device" / "privacy-ledger.json").exists()
    assert agent.epsilon() == 0.0


def test_a_device_keeps_only_the_models_it_may_still_train_from(
    tmp_path: Path, owner_keys: OwnerKeys
) -> None:
    # Prepare: a task whose rounds 1 to 3 are anchored and their models published on chain
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    aggregator = chain.new_account()
    with Mosquitto(tmp_path / "broker") as broker:
        owner = task_owner(chain, contract.address, owner_keys, broker)
        spec = occupancy_spec(owner.context_hash, rounds=4, quorum=1)
        models = [np.full(spec.n_params, float(round_no)) for round_no in range(4)]
        owner.create_task(spec, aggregator.address, models[0])
        anchoring = chain.client(contract.address, aggregator)
        for round_no in (1, 2, 3):
            digest = keccak(f"round {round_no}".encode())
            anchoring.anchor_round(spec.task_id, round_no, digest, digest, 2)
            owner.chain.publish_model(spec.task_id, round_no, model_hash(models[round_no]))
        agent, suite = simulated_device(chain, contract, spec.task, broker, tmp_path / "device")
        agent.start()
        # Execute: models 1 to 3 released one after the other, as a long task releases them
        with MqttLink("owner", broker.settings, lambda t, p: None, []) as link:
            for round_no in (1, 2, 3):
                params = model_bytes(models[round_no])
                message = envelope.encode(
                    "model", round=round_no, params=params, model_hash=keccak(params)
                )
                link.publish(TaskTopics(spec.task).model, message, retain=True)
            deadline = time.monotonic() + 120  # a bound for a failure only: the wait ends on
            while 3 not in agent.models and time.monotonic() < deadline:  # the last model
                time.sleep(0.05)
        held = agent.models
        agent.stop()
        suite.close()
        owner.stop()
    # Assert: the newest model (for the next round) and the one before (for a late update of
    # the round it closed); memory does not grow with the task's rounds
    assert held == (2, 3)
