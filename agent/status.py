"""``truscl agent status``: what a device has done, from its state folder (and the chain).

Everything comes from files the agent keeps (its key's address, the task's terms as verified,
the privacy ledger, the state file with its outbox and each round's state), so it works while
the agent runs (the state file is SQLite in WAL mode), when it is stopped, and with the network
down; the chain is asked only whether the device is registered.
"""

from __future__ import annotations

from typing import Any

from truscl.agent.config import AgentConfig
from truscl.agent.device import LEDGER_FILE, OUTBOX_FILE, SPEC_FILE
from truscl.agent.health import describe_health, read_health
from truscl.agent.outbox import Outbox
from truscl.agent.rounds import Phase
from truscl.chain.reader import RpcReader
from truscl.errors import ChainError
from truscl.keyfile import load_signing_key
from truscl.privacy.accounting import PrivacyLedger
from truscl.task import TaskSpec

CHAIN_TIMEOUT_S = 5.0


def agent_status(config: AgentConfig) -> dict[str, Any]:
    account = load_signing_key(config.key)
    state = config.state
    status: dict[str, Any] = {
        "address": account.address,
        "name": config.name,
        "task": config.task,
        "state": str(state),
        "hardware": config.hardware,
        "broker": config.broker.address,
    }
    spec = (
        TaskSpec.decode((state / SPEC_FILE).read_bytes()) if (state / SPEC_FILE).exists() else None
    )
    ledger_file = state / LEDGER_FILE
    ledger = PrivacyLedger.from_json(ledger_file.read_text()) if ledger_file.exists() else None
    status["rounds_charged"] = len(ledger.rounds) if ledger else 0
    if spec is not None:
        status["epsilon"] = round(ledger.epsilon(spec.dp.delta), 4) if ledger else 0.0
        status["epsilon_budget"] = spec.dp.epsilon_budget
        status["delta"] = spec.dp.delta
    status["outbox"], status["rounds"] = [], {}
    if (state / OUTBOX_FILE).exists():
        outbox = Outbox(state / OUTBOX_FILE)
        try:
            status["outbox"] = [pending.round for pending in outbox.pending()]
            rounds = outbox.rounds()
        finally:
            outbox.close()
        for phase in Phase:
            status["rounds"][str(phase)] = [s.round for s in rounds if s.phase == phase]
    try:
        chain = RpcReader(config.rpc, config.contract, CHAIN_TIMEOUT_S)
        try:
            status["registered"] = chain.is_device(account.address)
        finally:
            chain.close()
    except ChainError as exc:
        status["registered"] = None
        status["chain_error"] = str(exc)
    status["sensors"] = read_health(state)  # {} before the agent has sampled
    return status


def describe(status: dict[str, Any]) -> str:
    """The status as lines for a terminal."""
    registered = {True: "yes", False: "NO", None: "unknown"}[status["registered"]]
    lines = [
        f"device    {status['address']}" + (f" ({status['name']})" if status["name"] else ""),
        f"task      {status['task']}",
        f"registered on chain: {registered}"
        + (f" ({status['chain_error']})" if "chain_error" in status else ""),
        f"broker    {status['broker']}",
        f"sensors   {status['hardware']}",
    ]
    if "epsilon" in status:
        lines.append(
            f"privacy   epsilon {status['epsilon']:.3f} of {status['epsilon_budget']:g} "
            f"at delta {status['delta']:g}, {status['rounds_charged']} rounds charged"
        )
    else:
        lines.append(
            f"privacy   task terms not received yet; {status['rounds_charged']} rounds charged"
        )
    rounds = {phase: numbers for phase, numbers in status["rounds"].items() if numbers}
    lines.append(
        "rounds    "
        + (
            ", ".join(f"{phase} {_numbers(numbers)}" for phase, numbers in rounds.items())
            if rounds
            else "none yet"
        )
    )
    waiting = status["outbox"]
    lines.append(
        f"outbox    {len(waiting)} update(s) waiting for a receipt"
        + (f" (rounds {', '.join(map(str, waiting))})" if waiting else "")
    )
    lines += describe_health(status["sensors"])
    return "\n".join(lines)


def _numbers(rounds: list[int]) -> str:
    """Round numbers, runs of consecutive ones shortened: ``1-4, 6``."""
    runs: list[list[int]] = []
    for number in rounds:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
