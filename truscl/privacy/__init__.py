"""Privacy: record-level DP-SGD, its accounting, and CKKS encryption of updates by role."""

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

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "CkksProfile",
    "DpSgdConfig",
    "OwnerKeys",
    "PrivacyLedger",
    "SpentRound",
    "clip_by_l2",
    "clip_rows",
    "context_hash",
    "decrypt",
    "dp_sgd",
    "encrypt",
    "load_ciphertext",
    "load_context",
    "rdp_epsilon",
    "secure_generator",
    "sum_ciphertexts",
]
