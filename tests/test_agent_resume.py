"""The agent resumes its rounds from its state file, and its outbox gets through on its own:
a real broker, the in-process EVM, a real aggregator and owner, TenSEAL and real signatures."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import task_owner
from eth_account.signers.local import LocalAccount
from harness import synthetic_readings

from truscl.agent.device import DeviceAgent
from truscl.agent.health import SENSORS
from truscl.agent.outbox import Outbox
from truscl.agent.rounds import RETRY_FIRST_S, Phase, RoundState
from truscl.agent.sensors import Reading
from truscl.broker import Mosquitto
from truscl.chain import ChainClient, EmbeddedChain
from truscl.demo import occupancy_spec
from truscl.mqtt import MqttLink
from truscl.privacy.accounting import PrivacyLedger
from truscl.privacy.ckks import OwnerKeys
from truscl.server.aggregator import Aggregator
from truscl.server.archive import Archive
from truscl.server.owner import TaskOwner
from truscl.task import DpTerms, TaskSpec
from truscl.wire import TaskTopics, envelope
from truscl.wire.model import model_hash

pytestmark = pytest.mark.slow
WINDOW = 128


def readings(n: int = WINDOW) -> Callable[[], list[Reading]]:
    """A full window at the first call, nothing new after."""
    window = synthetic_readings(n, seed=7)

    def collect() -> list[Reading]:
        taken = list(window)
        window.clear()
        return taken

    return collect


@dataclass
class Task:
    chain: EmbeddedChain
    contract: ChainClient
    broker: Mosquitto
    owner: TaskOwner
    spec: TaskSpec
    aggregator_account: LocalAccount
    device: LocalAccount
    tmp: Path

    def aggregator(self) -> Aggregator:
        return Aggregator(
            spec=self.spec,
            public_context=self.owner.public_context,
            chain=self.chain.client(self.contract.address, self.aggregator_account),
            archive=Archive(self.tmp / "archive"),
            broker=self.broker.settings,
            expected=1,
        )

    def agent(
        self,
        clock: Callable[[], float] = time.time,
        collect: Callable[[], list[Reading]] | None = None,
        sensors: Collection[str] = SENSORS,
    ) -> DeviceAgent:
        return DeviceAgent(
            account=self.device,
            task=self.spec.task,
            chain=self.chain.client(self.contract.address),
            broker=self.broker.settings,
            workdir=self.tmp / "device",
            collect=collect or readings(),
            name="device",
            clock=clock,
            sensors=sensors,
        )

    def announce(self, deadline: float) -> None:
        """Round 1's retained announcement, as an aggregator (then gone) would publish it."""
        with MqttLink("aggregator", self.broker.settings, lambda t, p: None, []) as link:
            link.publish(
                TaskTopics(self.spec.task).round,
                envelope.encode(
                    "round",
                    round=1,
                    model_hash=model_hash(np.zeros(self.spec.n_params)),
                    deadline=deadline,
                ),
                retain=True,
            )

    def accepted(self, round_no: int) -> tuple[str, ...]:
        return Archive(self.tmp / "archive").round(self.spec.task, round_no).updates


@contextmanager
def one_device_task(tmp_path: Path, owner_keys: OwnerKeys, **terms: Any) -> Iterator[Task]:
    """A one-round task on chain whose initial model is out; no aggregator or agent yet.
    ``terms`` change the spec's."""
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    aggregator_account, device = chain.new_account(), chain.new_account()
    contract.register_device(device.address)
    with Mosquitto(tmp_path / "broker") as broker:
        owner = task_owner(chain, contract.address, owner_keys, broker)
        spec = occupancy_spec(
            owner.context_hash,
            rounds=1,
            quorum=1,
            round_seconds=600,
            window=WINDOW,
            dp=DpTerms(batch_size=16),
            **terms,
        )
        owner.create_task(spec, aggregator_account.address, np.zeros(spec.n_params))
        try:
            yield Task(chain, contract, broker, owner, spec, aggregator_account, device, tmp_path)
        finally:
            owner.stop()


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds}s"
        time.sleep(0.05)


def phase(agent: DeviceAgent, round_no: int) -> Phase | None:
    return next((s.phase for s in agent.rounds() if s.round == round_no), None)


@pytest.mark.parametrize("ledger_written", [False, True], ids=["before-ledger", "after-ledger"])
def test_an_agent_killed_after_charging_rebuilds_its_update_without_a_second_charge(
    tmp_path: Path,
    owner_keys: OwnerKeys,
    ledger_written: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="truscl.agent.device")
    with one_device_task(tmp_path, owner_keys) as task:
        # Prepare: what a kill -9 after charging round 1 leaves: its row says charged (entry 0
        # of the ledger), no update exists; the ledger file was written, or not yet
        (tmp_path / "device").mkdir()
        state = Outbox(tmp_path / "device" / "outbox.sqlite")
        charged = RoundState(
            1,
            Phase.CHARGED,
            deadline=time.time() + 600,
            model_hash=model_hash(np.zeros(task.spec.n_params)),
            ledger_index=0,
        )
        state.save([charged])
        state.close()
        dp = task.spec.dp
        if ledger_written:
            ledger = PrivacyLedger()
            ledger.record(task.spec.sampling_rate, dp.noise_multiplier, dp.local_steps)
            (tmp_path / "device" / "privacy-ledger.json").write_text(ledger.to_json())
        aggregator = task.aggregator().start()
        # Execute: the agent starts again
        agent = task.agent().start()
        try:
            wait_until(lambda: phase(agent, 1) == Phase.INCLUDED, "round 1 included")
            rounds = agent.rounds()
            spent = agent.epsilon()
        finally:
            agent.stop()
            aggregator.stop()
        accepted = task.accepted(1)
    # Assert: one charge in the ledger, one update accepted, built once and never charged anew
    ledger = PrivacyLedger.from_json((tmp_path / "device" / "privacy-ledger.json").read_text())
    assert len(ledger.rounds) == 1
    assert spent == ledger.epsilon(dp.delta) > 0
    assert [(s.round, s.ledger_index) for s in rounds] == [(1, 0)]
    assert rounds[0].update_id is not None and accepted == (rounds[0].update_id.hex(),)
    logged = [r.getMessage() for r in caplog.records]
    assert sum("rebuilding round 1's update, already charged" in m for m in logged) == 1
    assert sum("charge(s) the ledger had lost" in m for m in logged) == (not ledger_written)


def test_an_update_sent_while_the_aggregator_was_away_is_republished_without_a_restart(
    tmp_path: Path, owner_keys: OwnerKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="truscl.agent.device")
    now = [time.time()]
    with one_device_task(tmp_path, owner_keys) as task:
        # Prepare: round 1 is announced by an aggregator that is then gone, its session with
        # it: nobody receives the device's update
        task.announce(deadline=now[0] + 600)
        agent = task.agent(clock=lambda: now[0]).start()
        aggregator: Aggregator | None = None
        try:
            wait_until(lambda: phase(agent, 1) == Phase.SENT, "round 1 sent")
            # Execute: an aggregator comes back; the device's clock moves on, the link stays up
            aggregator = task.aggregator().start()

            def settled() -> bool:
                now[0] += RETRY_FIRST_S  # the backoff is on the device's clock
                return phase(agent, 1) == Phase.INCLUDED

            wait_until(settled, "round 1 included")
            rounds = agent.rounds()
        finally:
            agent.stop()
            if aggregator is not None:
                aggregator.stop()
        accepted = task.accepted(1)
    # Assert: the update first sent got through, republished as the same bytes
    logged = [r.getMessage() for r in caplog.records]
    assert any("republished its round 1 update" in m for m in logged)
    assert sum("round 1 update built" in m for m in logged) == 1
    assert rounds[0].update_id is not None and accepted == (rounds[0].update_id.hex(),)


def test_no_budget_is_spent_on_the_last_round_once_its_deadline_passed(
    tmp_path: Path, owner_keys: OwnerKeys
) -> None:
    now = time.time()
    with one_device_task(tmp_path, owner_keys) as task:
        # Prepare: the task's only (so last) round, announced with a deadline already behind
        # the device's clock; late updates are on, but there is no next round to count in
        assert task.spec.late_updates and task.spec.rounds == 1
        task.announce(deadline=now - 1)
        # Execute
        agent = task.agent(clock=lambda: now).start()
        try:
            wait_until(lambda: phase(agent, 1) == Phase.SKIPPED, "round 1 skipped")
            rounds = agent.rounds()
        finally:
            agent.stop()
    # Assert
    assert [(s.phase, s.reason, s.ledger_index) for s in rounds] == [
        (Phase.SKIPPED, "deadline passed", None)
    ]
    assert not (tmp_path / "device" / "privacy-ledger.json").exists()
