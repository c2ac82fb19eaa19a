"""Audit a task from the archive and the chain alone, with no key and no trust in the aggregator.

For every round: each archived update must be a well-formed, correctly signed update from a
registered device for this task and round (or, under the task term ``late_updates``, for the
round before: a late update still signs the round it was made for); no update may be counted
twice, in one round or across two (one per device and round made for); its leaf is recomputed
from the signed fields; the
Merkle root of the leaves and their count must equal the anchor on chain; and the archived
ciphertexts are summed again under the public context (CKKS addition is exact modular
arithmetic, so the sum's bytes are reproducible) and must hash to the anchored aggregate hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenseal as ts
from eth_utils import keccak

from truscl.chain import ChainClient
from truscl.errors import HeError, ProtocolError, SignatureError
from truscl.privacy.ckks import context_hash, load_context, sum_ciphertexts
from truscl.server.archive import Archive
from truscl.task import TaskSpec
from truscl.wire import Domain, Update, merkle_root


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

    @property
    def verified(self) -> int:
        return sum(r.verified for r in self.rounds)

    @property
    def total(self) -> int:
        return len(self.rounds)

    def as_dict(self) -> dict[str, object]:
        return {
            "verified": self.verified,
            "total": self.total,
            "problems": {str(r.round): list(r.problems) for r in self.rounds if r.problems},
        }


def audit_task(chain: ChainClient, archive: Archive, task: str) -> AuditReport:
    task_id = bytes.fromhex(task[2:])
    record = chain.task(task_id)
    public_context = archive.context(task)
    spec = TaskSpec.decode(archive.spec(task))
    task_problems: list[str] = []
    if spec.hash() != record.spec_hash:
        task_problems.append("archived task spec does not match the on-chain spec hash")
    if context_hash(public_context) != record.context_hash:
        task_problems.append("archived HE context does not match the on-chain context hash")
    context = load_context(public_context)
    domain = Domain(chain.chain_id, chain.address)
    n_rounds = max(record.rounds_anchored, max(archive.rounds(task), default=0))
    audits = []
    counted: dict[tuple[str, int], int] = {}  # (device, round made for) -> round counting it
    for round_no in range(1, n_rounds + 1):
        problems: list[str] = list(task_problems)
        updates = _audit_round(chain, archive, spec, round_no, context, domain, problems, counted)
        audits.append(RoundAudit(round_no, updates, tuple(problems)))
    return AuditReport(task, tuple(audits))


def _audit_round(
    chain: ChainClient,
    archive: Archive,
    spec: TaskSpec,
    round_no: int,
    context: ts.Context,
    domain: Domain,
    problems: list[str],
    counted: dict[tuple[str, int], int],
) -> int:
    task, task_id = spec.task, spec.task_id
    expected_context = bytes.fromhex(spec.context_hash[2:])
    anchor = chain.round_anchor(task_id, round_no)
    if anchor is None:
        problems.append("round is archived but not anchored on chain")
        return 0
    try:
        manifest = archive.round(task, round_no)
    except FileNotFoundError:
        problems.append("round is anchored but missing from the archive")
        return 0
    leaves: list[bytes] = []
    ciphertexts: list[bytes] = []
    for ident in manifest.updates:
        try:
            update = Update.decode(archive.get(ident))
            update.verify(domain)
        except (OSError, ProtocolError, SignatureError) as exc:
            problems.append(f"update {ident[:12]}: {exc}")
            continue
        who = update.device_address
        late = spec.late_updates and update.round == round_no - 1
        if update.task != task_id or (update.round != round_no and not late):
            problems.append(f"update from {who} belongs to another task or round")
        if update.context != expected_context:
            problems.append(f"update from {who} names another HE context")
        key = (who, update.round)
        if key in counted:
            problems.append(
                f"{who}'s update for round {update.round} counted twice "
                f"(round {counted[key]} counts one already)"
            )
        counted.setdefault(key, round_no)
        if not chain.is_device(who):
            problems.append(f"update from {who}, which is not registered")
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
            problems.append("Merkle root of the archived updates differs from the anchored root")
    try:
        aggregate = sum_ciphertexts(context, ciphertexts, spec.n_params)
    except (HeError, ValueError) as exc:
        problems.append(f"archived ciphertexts do not sum: {exc}")
    else:
        if keccak(aggregate) != anchor.aggregate_hash:
            problems.append("re-summed ciphertexts differ from the anchored aggregate hash")
    return len(leaves)
