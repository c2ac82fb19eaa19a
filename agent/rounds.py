"""The device's round logic, free of I/O: what to do next in each round of its task.

A round moves ``announced -> charged -> built -> sent -> accepted | rejected -> included``, or
ends ``skipped`` (never charged: its deadline passed, or the budget is spent) or ``abandoned``
(charged, but its update could not be built before a newer round came). :class:`RoundBook`
takes events (an announcement, a tick of the clock, what the agent did, a verified receipt or
inclusion proof, a restart from the state file, a reconnection) and returns the new states to
persist and the decisions to carry out; :mod:`agent.device` does the MQTT, chain and disk work
around it, as :mod:`server.rounds` is for the aggregator. Keeping it pure lets the tests walk
every transition, restarts included, without a broker or a clock.

Restart rules (the state file is written before each step takes effect):

* ``charged`` without ``built``: the ledger already holds the round's charge, and no byte of an
  update ever existed outside the dead process (the signed update enters the outbox and its
  round becomes ``built`` in one SQLite transaction, before it is published). The update is
  rebuilt **without charging again**, once, if the round is still the newest and may still
  count, on as many readings as it was charged for (so at the sampling rate it was charged
  at); otherwise it is ``abandoned``. Only one update can therefore ever leave the device
  for a round, and the ledger holds exactly one charge for it.
* ``built`` or ``sent``: the same bytes are published again from the outbox, never a new update.
* ``accepted``: the inclusion proof may still come (the aggregator sends it at the round's
  close); it is checked against the record kept in the state file.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from truscl.wire import UpdateRecord

RETRY_FIRST_S = 5.0  # republish an update still without a receipt after this long...
RETRY_MAX_S = 120.0  # ...doubling up to this: a missing aggregator is not flooded


class Phase(enum.StrEnum):
    ANNOUNCED = "announced"
    SKIPPED = "skipped"
    CHARGED = "charged"
    ABANDONED = "abandoned"
    BUILT = "built"
    SENT = "sent"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    INCLUDED = "included"


AWAITING_RECEIPT = (Phase.BUILT, Phase.SENT)
HAS_UPDATE = (*AWAITING_RECEIPT, Phase.ACCEPTED, Phase.REJECTED, Phase.INCLUDED)


@dataclass(frozen=True)
class RoundState:
    """One round as the device knows it; a row of the state file."""

    round: int
    phase: Phase
    deadline: float  # the aggregator's close, from the round's announcement (epoch s)
    model_hash: bytes
    ledger_index: int | None = None  # this round's charge is entry ``ledger_index`` of the ledger
    readings: int | None = None  # how many readings the charge was for (its sampling rate)
    update_id: bytes | None = None  # the signed update's id (Update.ident: the outbox key)
    record: UpdateRecord | None = None  # what the round's inclusion proof must prove
    reason: str = ""  # why it was skipped, abandoned or rejected
    counted_in: int = 0  # the round whose aggregate counts the update (from the receipt)
    anchor_tx: str = ""  # the anchoring transaction of a verified inclusion proof


@dataclass(frozen=True)
class Terms:
    """What the round rules need of the task spec."""

    rounds: int
    late_updates: bool


@dataclass(frozen=True)
class Train:
    """Build this round's update on model ``round - 1``; charge the ledger first if ``charge``,
    else train on the ``readings`` the round was charged for."""

    round: int
    model_hash: bytes
    charge: bool
    readings: int | None = None


@dataclass(frozen=True)
class Publish:
    """Publish (again) the outbox entry ``update_id``: the same bytes, never a new update."""

    round: int
    update_id: bytes


@dataclass(frozen=True)
class Drop:
    """Remove ``update_id`` from the outbox: its aggregator has decided on it."""

    update_id: bytes


Decision = Train | Publish | Drop


@dataclass
class Step:
    """An event's outcome: rows to write to the state file, then decisions to carry out."""

    changed: list[RoundState]
    decisions: list[Decision]


def may_count(round_no: int, deadline: float, now: float, terms: Terms) -> bool:
    """Whether an update made now for ``round_no`` can still be counted by the aggregator.

    Before the deadline it always can. After it, only where late updates count in the next
    round, and the task's last round has no next round.
    """
    if now < deadline:
        return True
    return terms.late_updates and round_no < terms.rounds


class RoundBook:
    """Every round of one task on this device, and the rules that move them on."""

    def __init__(
        self, states: Iterable[RoundState] = (), pending: Iterable[tuple[bytes, int]] = ()
    ) -> None:
        """``states`` and ``pending`` (the outbox: update id and round) from the state file."""
        self._rounds: dict[int, RoundState] = {s.round: s for s in states}
        self._pending: dict[bytes, int] = dict(pending)  # in the outbox: no receipt yet
        self._retry: dict[bytes, tuple[float, float]] = {}  # update id -> (next try, interval)

    def get(self, round_no: int) -> RoundState | None:
        return self._rounds.get(round_no)

    def states(self) -> list[RoundState]:
        return [self._rounds[r] for r in sorted(self._rounds)]

    def _set(self, state: RoundState, step: Step) -> RoundState:
        self._rounds[state.round] = state
        step.changed.append(state)
        return state

    # -- events ----------------------------------------------------------------------------

    def connected(self, now: float) -> Step:
        """The broker (re)connected: publish whatever waits for a receipt, and back off anew."""
        step = Step([], [])
        for update_id, round_no in sorted(self._pending.items(), key=lambda item: item[1]):
            step.decisions.append(Publish(round_no, update_id))
            self._retry[update_id] = (now + RETRY_FIRST_S, RETRY_FIRST_S)
        return step

    def announced(self, round_no: int, model_hash: bytes, deadline: float) -> Step:
        """The aggregator opened ``round_no``. Older rounds not yet charged are skipped, older
        charged ones without an update abandoned: the device works on the newest model only."""
        step = Step([], [])
        known = self._rounds.get(round_no)
        if known is None:
            self._set(RoundState(round_no, Phase.ANNOUNCED, deadline, model_hash), step)
        elif known.phase in (Phase.ANNOUNCED, Phase.CHARGED) and known.deadline != deadline:
            self._set(replace(known, deadline=deadline), step)  # re-announced after a restart
        for state in self.states():
            if state.round < round_no and state.phase == Phase.ANNOUNCED:
                self._set(replace(state, phase=Phase.SKIPPED, reason="a newer round"), step)
            elif state.round < round_no and state.phase == Phase.CHARGED:
                self._set(replace(state, phase=Phase.ABANDONED, reason="a newer round"), step)
        return step

    def tick(self, now: float, terms: Terms) -> Step:
        """Time passed: train for the newest open round if its update may still count, skip it
        if not, and republish updates whose receipt is overdue."""
        step = Step([], [])
        newest = max(self._rounds, default=None)
        if newest is not None:
            state = self._rounds[newest]
            if state.phase in (Phase.ANNOUNCED, Phase.CHARGED):
                if may_count(state.round, state.deadline, now, terms):
                    charge = state.phase == Phase.ANNOUNCED
                    step.decisions.append(
                        Train(state.round, state.model_hash, charge, state.readings)
                    )
                elif state.phase == Phase.ANNOUNCED:
                    self._set(replace(state, phase=Phase.SKIPPED, reason="deadline passed"), step)
                else:
                    self._set(replace(state, phase=Phase.ABANDONED, reason="deadline passed"), step)
        for update_id, (due, interval) in list(self._retry.items()):
            if update_id not in self._pending:
                del self._retry[update_id]
            elif now >= due:
                step.decisions.append(Publish(self._pending[update_id], update_id))
                longer = min(interval * 2, RETRY_MAX_S)
                self._retry[update_id] = (now + longer, longer)
        return step

    def budget_spent(self, round_no: int) -> Step:
        """The ledger cannot take this round: it is skipped, uncharged."""
        step = Step([], [])
        state = self._rounds[round_no]
        if state.phase == Phase.ANNOUNCED:
            self._set(replace(state, phase=Phase.SKIPPED, reason="privacy budget spent"), step)
        return step

    def charged(self, round_no: int, ledger_index: int, readings: int) -> Step:
        """The agent is about to append the round's charge, for training on ``readings``
        readings, as entry ``ledger_index``; this row is written first, so a restart finds the
        charge (and its rate) even if the ledger write was lost."""
        step = Step([], [])
        state = self._rounds[round_no]
        if state.phase != Phase.ANNOUNCED:
            raise ValueError(f"round {round_no} is {state.phase}, it cannot be charged")
        charged = replace(state, phase=Phase.CHARGED, ledger_index=ledger_index, readings=readings)
        self._set(charged, step)
        return step

    def built(self, round_no: int, update_id: bytes, record: UpdateRecord, now: float) -> Step:
        """The signed update exists; the agent writes this row with the outbox entry, in one
        transaction, then publishes."""
        step = Step([], [])
        state = self._rounds[round_no]
        if state.phase != Phase.CHARGED:
            raise ValueError(f"round {round_no} is {state.phase}, it has no charge to build on")
        self._set(replace(state, phase=Phase.BUILT, update_id=update_id, record=record), step)
        step.decisions.append(Publish(round_no, update_id))
        self._pending[update_id] = round_no
        self._retry[update_id] = (now + RETRY_FIRST_S, RETRY_FIRST_S)
        return step

    def sent(self, round_no: int) -> Step:
        """The update was handed to the broker (QoS 1)."""
        step = Step([], [])
        state = self._rounds[round_no]
        if state.phase == Phase.BUILT:
            self._set(replace(state, phase=Phase.SENT), step)
        return step

    def receipt(self, update_id: bytes, accepted: bool, reason: str, counted_in: int) -> Step:
        """A receipt the task's aggregator signed (the agent verified it): the outbox entry
        goes, whatever the verdict. A proof of inclusion already held outranks a later
        rejection (say, of a republished copy after the round closed)."""
        step = Step([], [])
        if self._pending.pop(update_id, None) is not None:
            step.decisions.append(Drop(update_id))
        self._retry.pop(update_id, None)
        state = self._by_update(update_id)
        if state is None or state.phase not in AWAITING_RECEIPT:
            return step
        if accepted:
            self._set(replace(state, phase=Phase.ACCEPTED, counted_in=counted_in), step)
        else:
            self._set(replace(state, phase=Phase.REJECTED, reason=reason), step)
        return step

    def candidates(self, closed_round: int) -> list[RoundState]:
        """Rounds whose update an inclusion proof for ``closed_round`` may be about."""
        return [
            s
            for s in self.states()
            if s.phase in HAS_UPDATE and closed_round in (s.round, s.counted_in)
        ]

    def included(self, round_no: int, anchor_tx: str) -> Step:
        """The inclusion proof of this round's update verified against the chain. The outbox
        entry, if its receipt is still missing, stays until one comes: only the aggregator's
        signed word removes it (a republished copy draws a receipt, if only a rejection)."""
        step = Step([], [])
        state = self._rounds[round_no]
        if state.phase == Phase.INCLUDED or state.update_id is None:
            return step
        self._set(replace(state, phase=Phase.INCLUDED, anchor_tx=anchor_tx), step)
        return step

    def _by_update(self, update_id: bytes) -> RoundState | None:
        for state in self._rounds.values():
            if state.update_id == update_id:
                return state
        return None
