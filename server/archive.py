"""The aggregator's content-addressed archive, which lets anyone audit a round.

Blobs (signed updates, aggregates, the public HE context) are stored under their ids, so a blob
cannot be swapped without its name changing: a signed update under its own id
(:attr:`truscl.wire.update.Update.ident`, which commits to its fields, ciphertext and
signature), every other blob under its keccak hash. Per task, a JSON record names the
context; per round, a manifest names the update blobs, the root, the aggregate and the
anchor transaction. Every write goes to a temporary file, is flushed and renamed into place:
a crash leaves the old file or the new one, never half of one. A blob is on disk before the
aggregator acknowledges it.

Group commit: an fsync costs milliseconds, far more than validating an update, so the
aggregator hands over the updates it accepts with ``put_later`` and ``commit`` returns once all
of them are flushed and in place, the directory synced once. Where the platform has syncfs(2)
(Linux), each blob is written as it is handed over (a copy into the page cache) and the group
is flushed by one syncfs of the archive's file system, not by an fsync per blob: the
aggregator's CPU per update falls from about 1.4 to 1.15 ms, and it takes 1,017-1,140
updates/s in process against 925-953 (ext4, 2 cores, ``bench/aggregator.py``); writing in the
aggregator's thread rather than handing each write to another saves a further tenth (1,185-1,277
against 1,062-1,196 updates/s, 4 interleaved pairs). syncfs flushes whatever else is dirty on
that file system too, so the archive belongs on a file system without heavy writers of its own
(``docs/deploy.md``). Elsewhere the blobs are written and fsynced by a few threads at once
while the aggregator validates the next ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from truscl.errors import ProtocolError
from truscl.files import sync_directory, syncfs, temporary_name, write_atomically, write_file
from truscl.hashing import keccak
from truscl.wire.update import Update

# Per-task files naming a blob: the spec, the public context, and (when a key holder's
# transcript is archived) the key-generation record.
POINTERS = ("spec", "context", "keygen")
_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_HASH = re.compile(r"(0x)?[0-9a-fA-F]{64}")  # the aggregator writes roots without 0x
# Blob writes in flight at once where each is fsynced (no syncfs): enough for the file system
# to merge their flushes, few enough that a Pi's SD card is not flooded.
WRITERS = 4


def is_blob_id(ident: object) -> bool:
    """A blob's name: its id in hex, 64 lower-case digits (no path, no ``..``)."""
    return isinstance(ident, str) and _BLOB_ID.fullmatch(ident) is not None


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
        """Parse a manifest; ``ProtocolError`` saying what is wrong when it is not one.

        Blob ids are checked to be ids, since they become file names: a manifest naming
        ``../../x`` must not make an auditor read outside the archive.
        """
        try:
            data: Any = json.loads(text)
        except ValueError:
            raise ProtocolError("not JSON") from None
        expected = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ProtocolError(f"expected an object with keys {sorted(expected)}, got {keys}")
        updates = data["updates"]
        if not isinstance(updates, list) or not all(is_blob_id(u) for u in updates):
            raise ProtocolError("updates must be a list of blob ids")
        if not is_blob_id(data["aggregate"]):
            raise ProtocolError("aggregate must be a blob id")
        round_no = data["round"]
        if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 1:
            raise ProtocolError("round must be a positive integer")
        for key in ("task", "root", "aggregate_hash", "anchor_tx"):
            if not isinstance(data[key], str) or not _HASH.fullmatch(data[key]):
                raise ProtocolError(f"{key} must be 64 hex digits")
        return cls(**{**data, "updates": tuple(updates)})


class Archive:
    """``sync_file_system``: flush each group of blobs with one syncfs (the default where the
    platform has it) rather than an fsync per blob."""

    def __init__(self, root: Path, sync_file_system: bool | None = None) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "rounds").mkdir(parents=True, exist_ok=True)
        if sync_file_system and syncfs is None:
            raise OSError("this platform has no syncfs: blobs can only be fsynced one by one")
        self._sync_file_system = syncfs is not None and sync_file_system is not False
        self._writers: ThreadPoolExecutor | None = None
        self._blobs = str(self.root / "blobs")
        self._writing: dict[str, tuple[Path, Future[None]]] = {}  # by path: temporary, write
        # The group's handle on the file system, opened before its first write (its syncfs
        # raises the writeback errors of every write since), or why it could not be: raised
        # by ``commit``, like a failed write.
        self._group: int | OSError | None = None

    def put(self, blob: bytes, ident: bytes | None = None) -> str:
        """Store ``blob`` durably under ``ident``, its checked id (by default its keccak)."""
        name = (keccak(blob) if ident is None else ident).hex()
        path = self.root / "blobs" / name
        if not path.exists():
            write_atomically(path, blob)
        return name

    def put_later(self, blob: bytes, ident: bytes) -> None:
        """Start writing ``blob`` (whose checked id is ``ident``); durable after ``commit``.
        A blob in place already is written again, not looked up (the aggregator hands over
        only what it has not archived, unless a crash came between archive and journal): the
        same bytes, and one system call fewer per update, 1,085-1,109 updates/s against
        1,008-1,086 in 4 interleaved pairs. (On the hot path: plain string paths, not
        ``Path`` objects.)"""
        path = os.path.join(self._blobs, ident.hex())
        if path in self._writing:
            return
        temporary = temporary_name(Path(path))
        if not self._sync_file_system:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="archive")
            self._writing[path] = (temporary, self._writers.submit(write_file, temporary, blob))
            return
        if self._group is None:
            try:
                self._group = os.open(self._blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                self._group = exc
        # Written here and now: without its fsync, a write is a copy into the page cache.
        written: Future[None] = Future()
        try:
            write_file(temporary, blob, fsync=False)
            written.set_result(None)
        except OSError as exc:
            written.set_exception(exc)
        self._writing[path] = (temporary, written)

    def commit(self) -> None:
        """Wait for the blobs given to ``put_later``, flush them and move them into place;
        ``OSError`` if any could not be written or flushed, and then none is in place. (A blob
        in place that no journal names is harmless: the archive is content-addressed.)"""
        writing, self._writing = self._writing, {}
        group, self._group = self._group, None
        failures = [group, *(future.exception() for _, future in writing.values())]
        try:
            failed = next((exc for exc in failures if isinstance(exc, BaseException)), None)
            if failed is not None:
                raise failed
            if isinstance(group, int):
                assert syncfs is not None  # a group is opened only then
                syncfs(group)  # every blob's bytes, before any of their names
            for path, (temporary, _) in writing.items():
                os.replace(temporary, path)
        finally:
            if isinstance(group, int):
                os.close(group)
            for temporary, _ in writing.values():
                with contextlib.suppress(OSError):  # a leftover is overwritten the next time
                    temporary.unlink(missing_ok=True)
        if writing:
            sync_directory(Path(self._blobs))

    def get(self, ident: str) -> bytes:
        """The blob named ``ident``, checked to be its keccak (for an update: :meth:`update`)."""
        blob = self._read(ident)
        if keccak(blob).hex() != ident:
            raise ProtocolError(f"archived blob {ident} does not match its name")
        return blob

    def update(self, ident: str) -> tuple[bytes, Update]:
        """The signed update named ``ident``: its bytes and the update they decode to, checked
        to be the update's id."""
        blob = self._read(ident)
        try:
            update = Update.decode(blob)
        except ProtocolError as exc:
            raise ProtocolError(f"archived update {ident} does not match its name: {exc}") from None
        if update.ident.hex() != ident:
            raise ProtocolError(f"archived update {ident} does not match its name")
        return blob, update

    def _read(self, ident: str) -> bytes:
        if not is_blob_id(ident):
            raise ProtocolError(f"{ident[:24]!r} is not a blob id")
        return (self.root / "blobs" / ident).read_bytes()

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
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ProtocolError("not text") from None
        return RoundManifest.from_json(text)

    def rounds(self, task: str) -> list[int]:
        """The rounds with a manifest (files that are not ``<round>.json`` are not rounds)."""
        stems = (p.stem for p in self._task_dir(task).glob("*.json"))
        return sorted(int(stem) for stem in stems if stem.isdecimal() and int(stem) > 0)

    def _task_dir(self, task: str) -> Path:
        path = self.root / "rounds" / task.lower()
        path.mkdir(parents=True, exist_ok=True)
        return path
