"""Privacy: record-level DP-SGD, its accounting, CKKS encryption of updates by role, and
threshold decryption among k key holders."""

from truscl.privacy.accounting import PrivacyLedger, SpentRound, rdp_epsilon
from truscl.privacy.ckks import (
    DEFAULT_PROFILE,
    PROFILES,
    CkksProfile,
    OwnerKeys,
    context_hash,
    decrypt,
    encrypt,
    load_ciphertext,
    load_context,
    sum_ciphertexts,
)
from truscl.privacy.dp import DpSgdConfig, clip_by_l2, clip_rows, dp_sgd, secure_generator
from truscl.privacy.threshold import (
    SMUDGING_SIGMA,
    KeygenTranscript,
    KeyShare,
    PartialDecryption,
    SeedShare,
    collective_public_context,
    combine,
    common_seed,
    contribution_commitment,
    run_keygen,
)

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "SMUDGING_SIGMA",
    "CkksProfile",
    "DpSgdConfig",
    "KeyShare",
    "KeygenTranscript",
    "OwnerKeys",
    "PartialDecryption",
    "PrivacyLedger",
    "SeedShare",
    "SpentRound",
    "clip_by_l2",
    "clip_rows",
    "collective_public_context",
    "combine",
    "common_seed",
    "context_hash",
    "contribution_commitment",
    "decrypt",
    "dp_sgd",
    "encrypt",
    "load_ciphertext",
    "load_context",
    "rdp_epsilon",
    "run_keygen",
    "secure_generator",
    "sum_ciphertexts",
]
