"""What a decrypted aggregate may look like before anything derived from it is released.

A CKKS decryption published next to its ciphertext can leak the secret key, and a crafted
ciphertext makes that easy: an honest encryption with ``2^57`` added to its second polynomial
passes every check the aggregator can make (it is well-formed, at the right level and scale),
yet decrypts to the plaintext plus ``2^57 * s``, the secret key itself scaled up. The owner
therefore releases a round only if its decryption looks like what the task's terms allow:

* each of the model's values, and their L2 norm, at most ``updates x update_clip`` (every
  device clips its delta to ``update_clip`` in L2, so the sum of ``updates`` deltas cannot
  exceed that in any value or in norm), plus a slack for the noise;
* every other value a ciphertext carries within the noise of zero: the encoder fills the slots
  after a vector's values with zeros, so in an honest sum each of them is noise alone.

The slack: each key holder's smudging noise (Gaussian, sigma per plaintext coefficient) lands
in each decoded value as Gaussian noise of standard deviation ``sigma * sqrt(N / 2) / scale``
(:meth:`CkksProfile.smudging_error`): 4.3e-5 at N = 4096, sigma = 2^20, scale = 2^40. With k
holders the noise is ``sqrt(k)`` times that; the slack is ``SLACK_SIGMAS`` = 16 of those
standard deviations (a Gaussian passes 16 sigma with probability below 1e-57, so an honest round
is never refused for its noise), plus the profile's ``encryption_noise`` for the aggregate's
own encryption noise (ckks-4096-60-49: 1e-6, measured at most ~1.5e-8 for ten fresh
encryptions). For two holders at ckks-4096-60-49: 9.8e-4 per value. The L2 bound gets
``sqrt(n_params)`` slacks. A crafted ``2^57`` offset moves the values by about
``2^57 * sqrt(N) / 2^40`` ~ 8e6: far outside.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from truscl.privacy.ckks import CkksProfile

SLACK_SIGMAS = 16.0


class Refusal(enum.IntEnum):
    """Why a round was refused; the codes the contract's ``refuseRound`` takes."""

    OUT_OF_BOUNDS = 1  # a model slot, or the L2 norm, above what the terms allow
    PADDING = 2  # a value beyond the model's parameters was not zero within the noise
    UNDER_COHORT = 3  # the round counted fewer updates than the task's minimum cohort
    UNDECRYPTABLE = 4  # the holders' partial decryptions did not combine


def noise_slack(profile: CkksProfile, holders: int, sigma: float | None = None) -> float:
    """The per-value slack for ``holders`` partial decryptions smudged with ``sigma`` (the
    profile's by default; see the module)."""
    per_holder = profile.smudging_error(profile.smudging_sigma if sigma is None else sigma)
    return SLACK_SIGMAS * math.sqrt(holders) * per_holder + profile.encryption_noise


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

        ``slots`` is every value of every ciphertext, ``(chunks, values_per_ciphertext)``, as
        :func:`truscl.privacy.threshold.combine_slots` returns them: ciphertext ``c`` carries
        values ``c * values_per_ciphertext`` onwards, then zeros.
        """
        rows = np.asarray(slots, dtype=np.float64)
        chunks, width = rows.shape
        if chunks != math.ceil(self.n_params / width) or not np.all(np.isfinite(rows)):
            return Refusal.UNDECRYPTABLE
        flat = rows.reshape(-1)
        values, padding = flat[: self.n_params], flat[self.n_params :]
        if np.max(np.abs(values)) > self.slot_bound or np.linalg.norm(values) > self.norm_bound:
            return Refusal.OUT_OF_BOUNDS
        if padding.size and np.max(np.abs(padding)) > self.slack:
            return Refusal.PADDING
        return None
