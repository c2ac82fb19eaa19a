"""The aggregator's content-addressed archive, which lets anyone audit a round.

Blobs (signed updates, aggregates, the public HE context) are stored under their keccak hash,
so a blob cannot be swapped without its name changing. Per task, a JSON record names the
context; per round, a manifest names the update blobs, the root, the aggregate and the
anchor transaction. Every write goes to a temporary file, is fsynced and renamed into place:
a crash leaves the old file or the new one, never half of one. A blob is on disk before the
aggregator acknowledges it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_utils import keccak

from truscl.errors import ProtocolError
from truscl.files import write_atomically


@dataclass(frozen=True)
class RoundManifest:
    task: str
    round: int
    updates: tuple[str, ...]  # blob ids (hex) of the accepted signed updates
    root: str
    aggregate: str  # blob id of the aggregate ciphertext
    aggregate_hash: str
    anchor_tx: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RoundManifest:
        data: dict[str, Any] = json.loads(text)
        data["updates"] = tuple(data["updates"])
        return cls(**data)


class Archive:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "rounds").mkdir(parents=True, exist_ok=True)

    def put(self, blob: bytes) -> str:
        ident = keccak(blob).hex()
        path = self.root / "blobs" / ident
        if not path.exists():
            write_atomically(path, blob)
        return ident

    def get(self, ident: str) -> bytes:
        path = self.root / "blobs" / ident
        blob = path.read_bytes()
        if keccak(blob).hex() != ident:
            raise ProtocolError(f"archived blob {ident} does not match its name")
        return blob

    def put_task(self, task: str, spec: bytes, context: bytes) -> None:
        """Keep the task spec and public HE context: an auditor checks both against the chain."""
        for name, blob in (("spec", spec), ("context", context)):
            write_atomically(self._task_dir(task) / name, self.put(blob).encode())

    def spec(self, task: str) -> bytes:
        return self.get((self._task_dir(task) / "spec").read_text().strip())

    def context(self, task: str) -> bytes:
        return self.get((self._task_dir(task) / "context").read_text().strip())

    def put_round(self, manifest: RoundManifest) -> None:
        path = self._task_dir(manifest.task) / f"{manifest.round}.json"
        write_atomically(path, manifest.to_json().encode())

    def round(self, task: str, round_no: int) -> RoundManifest:
        path = self._task_dir(task) / f"{round_no}.json"
        return RoundManifest.from_json(path.read_text())

    def rounds(self, task: str) -> list[int]:
        return sorted(int(p.stem) for p in self._task_dir(task).glob("*.json"))

    def _task_dir(self, task: str) -> Path:
        path = self.root / "rounds" / task.lower()
        path.mkdir(parents=True, exist_ok=True)
        return path
