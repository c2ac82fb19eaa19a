"""What a decrypted aggregate may look like before anything derived from it is released.

A CKKS decryption published next to its ciphertext can leak the secret key, and a crafted
ciphertext makes that easy: an honest encryption with ``2^57`` added to its second polynomial
passes every check the aggregator can make (it is well-formed, at the right level and scale),
yet decrypts to the plaintext plus ``2^57 * s``, the secret key itself scaled up. The owner
therefore releases a round only if its decryption looks like what the task's terms allow:

* each of the model's slots, and their L2 norm, at most ``updates x update_clip`` (every device
  clips its delta to ``update_clip`` in L2, so the sum of ``updates`` deltas cannot exceed that
  in any slot or in norm), plus a slack for the noise;
* every other slot within the noise of the value it replicates: TenSEAL encodes a vector
  shorter than a ciphertext's slots cyclically repeated (slot ``j`` holds value ``j mod m`` of
  the ``m`` values the ciphertext carries), so in an honest sum each such slot equals its
  original up to the two slots' noise (bound: twice the slack).

The slack: each key holder's smudging noise (Gaussian, sigma per plaintext coefficient) lands
in each decoded slot as Gaussian noise of standard deviation ``sigma * sqrt(N / 2) / scale``
(the canonical embedding sums N coefficients times unit roots; the real part keeps half of the
variance): 4.3e-5 at N = 4096, sigma = 2^20, scale = 2^40. With k holders the noise is
``sqrt(k)`` times that; the slack is ``SLACK_SIGMAS`` = 16 of those standard deviations (a
Gaussian passes 16 sigma with probability below 1e-57, so an honest round is never refused for
its noise), plus ``ENCRYPTION_NOISE`` for the aggregate's own encryption noise (measured at most
1.8e-8 for ten fresh encryptions). For two holders at ckks-4096: 9.8e-4 per slot. The L2 bound
gets ``sqrt(n_params)`` slacks. A crafted ``2^57`` offset moves the slots by about
``2^57 * sqrt(N) / 2^40`` ~ 8e6: far outside.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from truscl.privacy.ckks import CkksProfile
from truscl.privacy.threshold import SMUDGING_SIGMA

SLACK_SIGMAS = 16.0
ENCRYPTION_NOISE = 1e-6


class Refusal(enum.IntEnum):
    """Why a round was refused; the codes the contract's ``refuseRound`` takes."""

    OUT_OF_BOUNDS = 1  # a model slot, or the L2 norm, above what the terms allow
    PADDING = 2  # a slot beyond the model's parameters was not a replica of its value
    UNDER_COHORT = 3  # the round counted fewer updates than the task's minimum cohort
    UNDECRYPTABLE = 4  # the holders' partial decryptions did not combine


def noise_slack(profile: CkksProfile, holders: int, sigma: float = SMUDGING_SIGMA) -> float:
    """The per-slot slack for ``holders`` smudged partial decryptions (see the module)."""
    per_holder = sigma * math.sqrt(profile.poly_modulus_degree / 2) / 2.0**profile.global_scale_bits
    return SLACK_SIGMAS * math.sqrt(holders) * per_holder + ENCRYPTION_NOISE


@dataclass(frozen=True)
class ReleaseBounds:
    """The bounds one round's decryption must meet: the task's terms and the round's count."""

    n_params: int
    updates: int
    update_clip: float
    slack: float

    @property
    def slot_bound(self) -> float:
        return self.updates * self.update_clip + self.slack

    @property
    def norm_bound(self) -> float:
        return self.updates * self.update_clip + math.sqrt(self.n_params) * self.slack

    def check(self, slots: np.ndarray) -> Refusal | None:
        """``None`` if the decryption may be released; else why not.

        ``slots`` is every slot of every ciphertext, ``(chunks, slot_count)``, as
        :func:`truscl.privacy.threshold.combine_slots` returns them: ciphertext ``c`` carries
        values ``c * slot_count`` onwards in its first slots, repeated to fill the rest.
        """
        rows = np.asarray(slots, dtype=np.float64)
        chunks, slot_count = rows.shape
        if chunks != math.ceil(self.n_params / slot_count) or not np.all(np.isfinite(rows)):
            return Refusal.UNDECRYPTABLE
        values = np.concatenate(
            [row[: min(slot_count, self.n_params - c * slot_count)] for c, row in enumerate(rows)]
        )
        if np.max(np.abs(values)) > self.slot_bound or np.linalg.norm(values) > self.norm_bound:
            return Refusal.OUT_OF_BOUNDS
        for c, row in enumerate(rows):
            carried = min(slot_count, self.n_params - c * slot_count)
            replicas = row[np.arange(slot_count) % carried]
            if np.max(np.abs(row - replicas)) > 2 * self.slack:
                return Refusal.PADDING
        return None
