"""A task's figures, read from what the services keep: the aggregator's journal (rounds, the
updates each counted, refusals by reason) and archive (the signed updates: their size and the
epsilon each device signed it had spent), the chain (anchoring transactions and their gas,
released models, refused rounds) and, for accuracy, the owner's released models.

One reader feeds both ``truscl report`` and the aggregator's status page, so the two never
disagree. Archived blobs are content-addressed and mined transactions final: what it learnt of
them is kept, so a status page reloaded every few seconds reads each blob once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from truscl.chain import ChainClient
from truscl.report import DeviceFigures, RoundFigures, TaskFigures
from truscl.server.archive import Archive
from truscl.server.journal import Journal
from truscl.task import TaskSpec

NO_ACCURACY = "not available: no evaluation set was given (`truscl report --test-set FILE.npz`)"


@dataclass(frozen=True)
class _Blob:
    size: int
    epsilon: float


def journal_path(archive: Path, task: str) -> Path:
    """Where the aggregator keeps a task's journal: beside its archive."""
    return archive / "journal" / f"{task.lower()}.sqlite"


class TaskFigureReader:
    """Reads a task's figures on demand (no key needed; it never writes)."""

    def __init__(self, chain: ChainClient, archive: Archive, task: str) -> None:
        self.chain = chain
        self.archive = archive
        self.task = task.lower()
        self._blobs: dict[str, _Blob] = {}
        self._gas: dict[str, int] = {}
        self._released: dict[int, tuple[str | None, int]] = {}

    def spec(self) -> TaskSpec | None:
        try:
            return TaskSpec.decode(self.archive.spec(self.task))
        except OSError:  # the aggregator has not had the task's terms yet
            return None

    def read(
        self, accuracy: Mapping[int, float] | None = None, accuracy_note: str = NO_ACCURACY
    ) -> TaskFigures:
        spec = self.spec()
        path = journal_path(self.archive.root, self.task)
        if spec is None or not path.is_file():
            return TaskFigures(self.task, spec.rounds if spec else 0, (), (), {}, accuracy_note)
        journal = Journal.read_only(path)
        try:
            return self._read(journal, spec, accuracy or {}, accuracy_note)
        finally:
            journal.close()

    def _read(
        self, journal: Journal, spec: TaskSpec, accuracy: Mapping[int, float], note: str
    ) -> TaskFigures:
        rejections = journal.rejections()
        rounds = []
        seen: dict[str, list[tuple[int, int, float]]] = {}  # device: (made for, counted in, eps)
        for journaled in journal.rounds():
            number = journaled.round
            updates = journal.updates(number)
            size = 0
            for entry in updates:
                blob = self._blob(entry.blob)
                size += blob.size
                seen.setdefault(entry.device, []).append((entry.made_for, number, blob.epsilon))
            tx = journaled.anchor_tx
            model, refused = self._release(spec, number) if tx else (None, 0)
            rounds.append(
                RoundFigures(
                    round=number,
                    state=journaled.state,
                    participants=sum(1 for u in updates if u.made_for == number),
                    late=sum(1 for u in updates if u.made_for != number),
                    bytes=size,
                    rejections=rejections.get(number, {}),
                    anchor_tx=tx,
                    gas=None if tx is None else self._gas_used(tx),
                    model_hash=model,
                    refused=refused,
                    accuracy=accuracy.get(number),
                )
            )
        totals: dict[str, int] = {}
        for counts in rejections.values():
            for reason, count in counts.items():
                totals[reason] = totals.get(reason, 0) + count
        devices = tuple(
            DeviceFigures(
                address=address,
                updates=len(entries),
                last_round=max(counted for _, counted, _ in entries),
                epsilon=max(eps for _, _, eps in entries),
                epsilon_by_round=tuple((made_for, eps) for made_for, _, eps in entries),
            )
            for address, entries in sorted(seen.items())
        )
        return TaskFigures(self.task, spec.rounds, tuple(rounds), devices, totals, note)

    def _blob(self, ident: str) -> _Blob:
        if ident not in self._blobs:
            data, update = self.archive.update(ident)
            self._blobs[ident] = _Blob(len(data), update.epsilon)
        return self._blobs[ident]

    def _release(self, spec: TaskSpec, round_no: int) -> tuple[str | None, int]:
        """The hash of the model released after an anchored round, and the owner's refusal
        code (0: none); final once the model is on chain, so read once from then on."""
        if round_no in self._released:
            return self._released[round_no]
        model = self.chain.model_hash(spec.task_id, round_no)
        if model is None:
            return None, 0
        release = "0x" + model.hex(), self.chain.round_refusal(spec.task_id, round_no)
        self._released[round_no] = release
        return release

    def _gas_used(self, tx: str) -> int:
        if tx not in self._gas:
            self._gas[tx] = self.chain.gas_used(tx)
        return self._gas[tx]


def model_accuracy(
    spec: TaskSpec, models: Mapping[int, np.ndarray], X: np.ndarray, y: np.ndarray
) -> dict[int, float]:
    """Accuracy of each released model (round: model released after it) on ``X``, the task's
    inputs (its features built and scaled as the devices build theirs: ``spec.inputs``)."""
    model = spec.make_model()
    return {r: model.accuracy(params, X, y) for r, params in models.items() if r > 0}
