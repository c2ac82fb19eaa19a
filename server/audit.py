"""Audit a task from the archive and the chain alone, with no key and no trust in the aggregator.

First the contract: the code at the address must be this release's ``Truscl`` runtime code
(its keccak equals the artifact's), or nothing it answers means what this audit assumes. Then,
for every round: the manifest must be well-formed, name this task and round, and cite as
``anchor_tx`` the transaction that emitted the round's ``RoundAnchored`` event; each archived
update must be a well-formed update, signed by the device it claims (a problem names both the
signer and the claimed device when they differ), for this task and round (or, under the task
term ``late_updates``, for the round before: a late update still signs the round it was made
for), from a device registered by the block the round was anchored in (a device registered
afterwards could not have been accepted honestly); no update may be counted twice, in one round
or across two (one per device and round made for); its leaf is recomputed from the signed
fields; the Merkle root of the leaves and their count must equal the anchor on chain; and the
archived ciphertexts are summed again under the public context (CKKS addition is exact modular
arithmetic, so the sum's bytes are reproducible) and must hash to the anchored aggregate hash.
Last, every blob of the archive must be named by a manifest, or be a task's spec, context or
key-generation record: an accepted update that no manifest counts is an update the aggregator
acknowledged and then dropped.

A missing, unreadable or corrupt file is a problem with one line, never an exception: the
audit's job is to say what is wrong with an archive, so a broken archive is its ordinary input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import tenseal as ts
from web3 import Web3

from truscl.chain import ChainClient
from truscl.chain.deployment import artifact_code_hash, code_hash
from truscl.errors import HeError, ProtocolError, TrusclError
from truscl.hashing import keccak
from truscl.privacy.ckks import context_hash, load_context, sum_ciphertexts
from truscl.server.archive import POINTERS, Archive, RoundManifest, is_blob_id
from truscl.task import TaskSpec
from truscl.wire import Domain, Update, merkle_root

_T = TypeVar("_T")


@dataclass(frozen=True)
class RoundAudit:
    round: int
    updates: int
    problems: tuple[str, ...]

    @property
    def verified(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class AuditReport:
    task: str
    rounds: tuple[RoundAudit, ...]
    problems: tuple[str, ...] = ()  # the task's own: the contract's code, the archive as a whole
    notes: tuple[str, ...] = ()  # worth saying, not a failure (an open round's updates)

    @property
    def verified(self) -> int:
        return sum(r.verified for r in self.rounds)

    @property
    def total(self) -> int:
        return len(self.rounds)

    @property
    def ok(self) -> bool:
        """Every round verified and nothing wrong with the task as a whole."""
        return not self.problems and self.verified == self.total

    def as_dict(self) -> dict[str, object]:
        problems: dict[str, list[str]] = {
            str(r.round): list(r.problems) for r in self.rounds if r.problems
        }
        if self.problems:
            problems["task"] = list(self.problems)
        return {"verified": self.verified, "total": self.total, "problems": problems}


def audit_task(
    chain: ChainClient,
    archive: Archive,
    task: str,
    extra_names: frozenset[str] = frozenset(),
    on_round: Callable[[int, int], None] | None = None,
) -> AuditReport:
    """Audit ``task``; ``extra_names`` are blob ids named elsewhere (a keygen record given to
    the auditor), so they are not reported as unnamed. ``on_round(done, total)`` follows the
    rounds as they are checked (a long task's audit shows its progress)."""
    task = task.lower()
    task_id = bytes.fromhex(task[2:])
    wrong_code = _code_problem(chain)
    if wrong_code is not None:  # its ABI may differ: do not call it
        return AuditReport(task, (), (wrong_code,))
    record = chain.task(task_id)
    task_problems: list[str] = []
    spec_blob = _archived(lambda: archive.spec(task), "the task spec", task_problems)
    context_blob = _archived(lambda: archive.context(task), "the HE context", task_problems)
    spec = context = None
    if spec_blob is not None:
        try:
            spec = TaskSpec.decode(spec_blob)
        except (TrusclError, ValueError, TypeError, KeyError) as exc:
            task_problems.append(f"the archived task spec is malformed: {exc}")
        else:
            if spec.hash() != record.spec_hash:
                task_problems.append("archived task spec does not match the on-chain spec hash")
    if context_blob is not None:
        if context_hash(context_blob) != record.context_hash:
            task_problems.append("archived HE context does not match the on-chain context hash")
        try:
            context = load_context(context_blob)
        except (TrusclError, ValueError) as exc:
            task_problems.append(f"the archived HE context does not load: {exc}")
    if spec is None or context is None:
        return AuditReport(task, (), tuple(task_problems))
    domain = Domain(chain.chain_id, chain.address)
    registry = _Registry(chain)
    n_rounds = max(record.rounds_anchored, max(archive.rounds(task), default=0))
    audits = []
    counted: dict[tuple[str, int], int] = {}  # (device, round made for) -> round counting it
    auditor = _RoundAuditor(chain, archive, spec, context, domain, registry, counted, set())
    for round_no in range(1, n_rounds + 1):
        problems: list[str] = list(task_problems)
        updates = auditor.audit(round_no, problems)
        audits.append(RoundAudit(round_no, updates, tuple(problems)))
        if on_round is not None:
            on_round(round_no, n_rounds)
    round_problems: dict[int, list[str]] = {a.round: list(a.problems) for a in audits}
    notes: list[str] = []
    unnamed = _unnamed_blob_problems(
        archive, task_id, record.rounds_anchored, domain, extra_names, round_problems, notes,
        auditor.unread,
    )  # fmt: skip
    audits = [RoundAudit(a.round, a.updates, tuple(round_problems[a.round])) for a in audits]
    return AuditReport(task, tuple(audits), tuple(unnamed), tuple(notes))


def _code_problem(chain: ChainClient) -> str | None:
    """Why the code at the contract's address is not this release's contract, or None."""
    # ChainClient exposes no node handle of its own; the audit needs eth_getCode only.
    w3: Web3 = chain._w3
    found = code_hash(w3, chain.address)
    if found is None:
        return f"no contract at {chain.address}"
    expected = artifact_code_hash()
    if found != expected:
        return (
            f"the code at {chain.address} is not this release's Truscl contract "
            f"(code hash {found[:12]}…, the artifact's {expected[:12]}…)"
        )
    return None


class _Registry:
    """Devices registered up to a block, rebuilt from ``DeviceRegistered`` events.

    Registration is judged at the block that anchored the round, not at the latest block: a
    device registered after the round could not have been accepted by an honest aggregator.
    Rounds are anchored in order, so the events are read once, forward, from the deployment
    block; the contract never unregisters, so the events alone are the registry.
    """

    def __init__(self, chain: ChainClient) -> None:
        self._chain = chain
        self._first = chain.deployment_block()
        self._read_to = self._first - 1
        self._devices: set[str] = set()

    def registered_at(self, block: int) -> set[str]:
        if block < self._read_to:  # not in order after all: read that range afresh
            return set(self._chain.registered_devices(self._first, block))
        if block > self._read_to:
            self._devices.update(self._chain.registered_devices(self._read_to + 1, block))
            self._read_to = block
        return self._devices


@dataclass
class _RoundAuditor:
    chain: ChainClient
    archive: Archive
    spec: TaskSpec
    context: ts.Context
    domain: Domain
    registry: _Registry
    counted: dict[tuple[str, int], int]
    unread: set[int]  # rounds whose manifest is missing or malformed

    def audit(self, round_no: int, problems: list[str]) -> int:
        spec, chain, archive = self.spec, self.chain, self.archive
        task, task_id = spec.task.lower(), spec.task_id
        anchor = chain.round_anchor(task_id, round_no)
        if anchor is None:
            problems.append("round is archived but not anchored on chain")
            return 0
        manifest = _manifest(archive, task, round_no, problems)
        if manifest is None:
            self.unread.add(round_no)
            return 0
        anchor_tx = chain.anchor_tx(task_id, round_no)
        if anchor_tx is None or manifest.anchor_tx.lower() != anchor_tx.lower():
            problems.append(
                f"manifest's anchor_tx {manifest.anchor_tx[:12]}… is not the transaction "
                f"that anchored the round ({(anchor_tx or 'none')[:12]}…)"
            )
        registered = self.registry.registered_at(anchor.block_number)
        leaves: list[bytes] = []
        ciphertexts: list[bytes] = []
        for ident in manifest.updates:
            archived = _archived(partial(archive.update, ident), f"update {ident[:12]}…", problems)
            if archived is None:
                continue
            _, update = archived
            who = _who(update, self.domain, ident, problems)
            late = spec.late_updates and update.round == round_no - 1
            if update.task != task_id or (update.round != round_no and not late):
                problems.append(f"update from {who} belongs to another task or round")
            if update.context != bytes.fromhex(spec.context_hash[2:]):
                problems.append(f"update from {who} names another HE context")
            key = (update.device_address, update.round)
            if key in self.counted:
                problems.append(
                    f"{who}'s update for round {update.round} counted twice "
                    f"(round {self.counted[key]} counts one already)"
                )
            self.counted.setdefault(key, round_no)
            if update.device_address not in registered:
                problems.append(
                    f"update from {who}, which was not registered when the round was "
                    f"anchored (block {anchor.block_number})"
                )
            leaves.append(update.leaf())
            ciphertexts.append(update.ciphertext)
        if len(leaves) != anchor.updates:
            problems.append(f"{len(leaves)} archived updates, {anchor.updates} anchored")
        try:
            root = merkle_root(leaves)
        except ProtocolError as exc:
            problems.append(f"archived updates do not form a Merkle tree: {exc}")
        else:
            if root != anchor.updates_root:
                problems.append(
                    "Merkle root of the archived updates differs from the anchored root"
                )
        try:
            aggregate = sum_ciphertexts(self.context, ciphertexts, spec.n_params)
        except (HeError, ValueError) as exc:
            problems.append(f"archived ciphertexts do not sum: {exc}")
        else:
            if keccak(aggregate) != anchor.aggregate_hash:
                problems.append("re-summed ciphertexts differ from the anchored aggregate hash")
        return len(leaves)


def _who(update: Update, domain: Domain, ident: str, problems: list[str]) -> str:
    """How problems name the update's author: its device, or its signer and the device it
    claims when they differ (a problem about "device X" must not blame X for another's
    signature)."""
    claimed = update.device_address
    try:
        signer = update.signer(domain)
    except (TrusclError, ValueError) as exc:
        problems.append(f"update {ident[:12]}… claiming device {claimed}: bad signature: {exc}")
        return f"an unknown signer (claiming device {claimed})"
    if signer != claimed:
        problems.append(f"update {ident[:12]}… is signed by {signer} but claims device {claimed}")
        return f"signer {signer} (claiming device {claimed})"
    return claimed


def _manifest(
    archive: Archive, task: str, round_no: int, problems: list[str]
) -> RoundManifest | None:
    try:
        manifest = archive.round(task, round_no)
    except FileNotFoundError:
        problems.append("round is anchored but its manifest is missing from the archive")
        return None
    except OSError as exc:
        problems.append(f"the round's manifest cannot be read ({_reason(exc)})")
        return None
    except ProtocolError as exc:
        problems.append(f"the round's manifest is malformed: {exc}")
        return None
    if manifest.task.lower() != task or manifest.round != round_no:
        problems.append(
            f"the manifest names task {manifest.task[:12]}… round {manifest.round}, not this round"
        )
    return manifest


def _archived(read: Callable[[], _T], what: str, problems: list[str]) -> _T | None:
    """``read()``, or None with one line in ``problems`` (no path, no errno) when it fails."""
    try:
        return read()
    except FileNotFoundError:
        problems.append(f"{what} is missing from the archive")
    except OSError as exc:
        problems.append(f"{what} cannot be read from the archive ({_reason(exc)})")
    except ProtocolError as exc:
        problems.append(f"{what}: {exc}")
    return None


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _unnamed_blob_problems(
    archive: Archive,
    task_id: bytes,
    rounds_anchored: int,
    domain: Domain,
    extra_names: frozenset[str],
    round_problems: dict[int, list[str]],
    notes: list[str],
    unread: set[int],
) -> list[str]:
    """Blobs no manifest, spec, context or keygen pointer of any task in the archive names.

    An update of this task for an anchored round is that round's problem (accepted, archived,
    not counted); one for a round not anchored yet is a note (a round still open); anything
    else is a problem of the task's archive. Updates a missing or malformed manifest would
    have named are not listed again: that round already fails for its manifest.
    """
    named = set(extra_names) | _named_blobs(archive)
    problems: list[str] = []
    for path in sorted((archive.root / "blobs").iterdir()):
        ident = path.name
        if ident.startswith(".") or ident in named:  # a write in progress, or accounted for
            continue
        if not is_blob_id(ident):
            problems.append(f"the archive holds a file {ident[:24]!r} that is not a blob")
            continue
        try:
            _, update = archive.update(ident)
        except (OSError, ProtocolError):
            problems.append(f"blob {ident[:12]}… is named by no manifest, spec or context")
            continue
        if update.task != task_id:
            problems.append(
                f"blob {ident[:12]}… (an update for another task) is named by no manifest"
            )
            continue
        who = _who(update, domain, ident, [])
        counting = [r for r in (update.round, update.round + 1) if r in round_problems]
        if counting and all(r in unread for r in counting):
            continue
        if update.round > rounds_anchored:
            notes.append(f"update {ident[:12]}… from {who} for round {update.round}, not anchored")
        elif counting:
            round_problems[counting[0]].append(
                f"update {ident[:12]}… from {who} for round {update.round} is archived "
                "but counted by no manifest"
            )
        else:
            problems.append(f"update {ident[:12]}… from {who} is named by no manifest")
    return problems


def _named_blobs(archive: Archive) -> set[str]:
    """Every blob id a pointer or a readable manifest of any task in the archive names."""
    named: set[str] = set()
    for folder in (archive.root / "rounds").iterdir():
        if not folder.is_dir():
            continue
        for pointer in POINTERS:
            try:
                named.add((folder / pointer).read_text().strip())
            except (OSError, UnicodeDecodeError):
                pass
        for path in folder.glob("*.json"):
            try:
                manifest = RoundManifest.from_json(_read_text(path))
            except (OSError, ProtocolError):
                continue
            named.update(manifest.updates)
            named.add(manifest.aggregate)
    return named


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ProtocolError("not text") from None
