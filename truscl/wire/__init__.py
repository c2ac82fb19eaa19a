"""Wire protocol shared by devices, aggregator, owner and auditors."""

from truscl.wire.chunking import DEFAULT_MAX_MESSAGE, Reassembler, blob_id, split, split_update
from truscl.wire.merkle import merkle_proof, merkle_root, verify_proof
from truscl.wire.topics import PREFIX, TaskTopics
from truscl.wire.update import Domain, Update, UpdateRecord

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "PREFIX",
    "Domain",
    "Reassembler",
    "TaskTopics",
    "Update",
    "UpdateRecord",
    "blob_id",
    "merkle_proof",
    "merkle_root",
    "split",
    "split_update",
    "verify_proof",
]
