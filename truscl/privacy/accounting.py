"""Privacy accounting by RDP, and a device's per-task ledger.

The epsilon a device reports must be the one anyone can recompute with Google's
``dp_accounting``: :mod:`truscl.privacy.rdp` ports its RDP of the Poisson-subsampled Gaussian and
its conversion to (epsilon, delta), at its default orders, and tests/test_rdp.py checks the port
against the library's own ``RdpAccountant``. The device thus never imports dp-accounting (seconds
on a Pi: scipy and the PLD module). RDP composes by addition, so the per-order RDP of one step is
computed once per mechanism and multiplied by the steps spent. PLD accounting, for reports, still
comes from dp-accounting (a server dependency), imported only when asked for.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from truscl.errors import ConfigError
from truscl.files import write_atomically
from truscl.privacy.rdp import RDP_ORDERS, epsilon_from_rdp, rdp_poisson_subsampled_gaussian

log = logging.getLogger(__name__)

_LEDGER_VERSION = 1
LEDGER_MODE = 0o600  # how much a device has contributed is its own business


@dataclass(frozen=True)
class SpentRound:
    """One DP-SGD run: ``steps`` Poisson-sampled Gaussian steps at rate ``q`` and ``sigma``."""

    sampling_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not self.noise_multiplier >= 0 or math.isinf(self.noise_multiplier):
            raise ConfigError(f"noise_multiplier must be finite, >= 0: {self.noise_multiplier}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")


def _epsilon(rounds: list[SpentRound], delta: float) -> float:
    """RDP epsilon of all ``rounds`` composed, identical (q, sigma) pairs merged first."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    steps_by_mechanism: Counter[tuple[float, float]] = Counter()
    for spent in rounds:
        steps_by_mechanism[(spent.sampling_rate, spent.noise_multiplier)] += spent.steps
    if not steps_by_mechanism:
        return 0.0
    rdp = [0.0] * len(RDP_ORDERS)
    for (q, sigma), steps in steps_by_mechanism.items():
        rdp = [
            total + steps * one for total, one in zip(rdp, _rdp_of_one_step(q, sigma), strict=True)
        ]
    epsilon, _ = epsilon_from_rdp(RDP_ORDERS, rdp, delta)
    return epsilon


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(sampling_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """Per-order RDP of one Poisson-subsampled Gaussian step, at :data:`RDP_ORDERS`."""
    return rdp_poisson_subsampled_gaussian(sampling_rate, noise_multiplier)


def rdp_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps, by the RDP accountant."""
    return _epsilon([SpentRound(sampling_rate, noise_multiplier, steps)], delta)


def pld_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    replace_one: bool = False,
) -> float:
    """The same events under dp-accounting's privacy-loss-distribution accountant.

    PLD accounting is tight where RDP's conversion to (epsilon, delta) is not, so it reports a
    smaller epsilon for the same steps (3.49 rather than 3.98 for the demo's ten rounds). Devices
    budget with RDP, the conservative figure; this is for reports. About half a second per call.
    With ``replace_one`` the neighbouring datasets differ in one reading replaced rather than
    added or removed (5.08 for the demo's ten rounds): dp-accounting's PLD accountant supports
    that relation for Poisson-sampled Gaussians directly (its RDP accountant does not).
    """
    import dp_accounting  # a server dependency: seconds to import, never on a device
    from dp_accounting.pld import PLDAccountant

    SpentRound(sampling_rate, noise_multiplier, steps)  # validates the terms
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    step = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    relation = dp_accounting.NeighboringRelation
    accountant = PLDAccountant(relation.REPLACE_ONE if replace_one else relation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """The DP events a device has spent on one task, persisted between rounds and reboots.

    Each round is kept as recorded (an audit trail of what the device reported), and epsilon is
    always recomputed from the whole history rather than summed, because RDP composes tighter
    than adding epsilons.
    """

    def __init__(self, rounds: list[SpentRound] | None = None) -> None:
        self._rounds: list[SpentRound] = list(rounds or [])

    @property
    def rounds(self) -> tuple[SpentRound, ...]:
        return tuple(self._rounds)

    def record(self, sampling_rate: float, noise_multiplier: float, steps: int) -> None:
        """Add a finished DP-SGD run; call it before the update leaves the device."""
        self._rounds.append(SpentRound(sampling_rate, noise_multiplier, steps))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far on this task at ``delta``."""
        return _epsilon(self._rounds, delta)

    def epsilon_if(
        self, sampling_rate: float, noise_multiplier: float, steps: int, delta: float
    ) -> float:
        """Epsilon the task would have spent after one more such run, for a budget check."""
        return _epsilon([*self._rounds, SpentRound(sampling_rate, noise_multiplier, steps)], delta)

    def save(self, path: Path) -> None:
        """Write the ledger atomically with mode 0600 from its first byte.

        The ledger counts the rounds the device trained in, which tells how much it has
        contributed (and, with the task's terms, roughly how much data it holds): nobody else
        on the device needs it. Atomic, so a crash never leaves a ledger that reads as less
        spent than it was.
        """
        write_atomically(Path(path), self.to_json().encode(), mode=LEDGER_MODE)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; a ledger others can read is tightened to 0600.

        Tightened, not refused: the file is the device's own record, not a credential, and what
        a wide mode exposed cannot be taken back, whereas refusing would stop the device, and
        an operator "fixing" that by deleting the ledger would reset the privacy budget to zero,
        the one outcome worse than the exposure. A symlink or a file we cannot tighten (not
        ours) is refused: the ledger must be the device's own regular file.
        """
        name = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"privacy ledger {name} is a symlink") from None
            raise ConfigError(f"cannot open privacy ledger {name}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError(f"privacy ledger {name} is not a regular file")
            mode = stat.S_IMODE(status.st_mode)
            if mode != LEDGER_MODE:
                try:
                    os.fchmod(fd, LEDGER_MODE)
                except OSError as exc:
                    raise ConfigError(
                        f"privacy ledger {name} has mode {mode:04o} and cannot be made 0600: "
                        f"{exc.strerror}"
                    ) from None
                log.warning("privacy ledger %s had mode %04o; tightened to 0600", name, mode)
            text = handle.read().decode("utf-8", errors="replace")
        return cls.from_json(text)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _LEDGER_VERSION,
                "rounds": [[r.sampling_rate, r.noise_multiplier, r.steps] for r in self._rounds],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_json`; a damaged file raises rather than reads as 0."""
        try:
            data = json.loads(text)
            version, rows = data["version"], data["rounds"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"privacy ledger is unreadable: {exc!r}") from exc
        if version != _LEDGER_VERSION:
            raise ConfigError(f"unsupported privacy ledger version {version!r}")
        try:
            return cls([SpentRound(float(q), float(s), n) for q, s, n in rows])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"privacy ledger holds an invalid round: {exc}") from exc


def task_epsilon(
    sampling_rate: float, noise_multiplier: float, steps: int, rounds: int, delta: float
) -> float:
    """Epsilon a device spends over ``rounds`` rounds of ``steps`` DP-SGD steps each."""
    return _epsilon([SpentRound(sampling_rate, noise_multiplier, steps * rounds)], delta)


def rounds_within_budget(
    sampling_rate: float, noise_multiplier: float, steps: int, delta: float, budget: float
) -> int:
    """The most rounds whose epsilon stays within ``budget`` (epsilon grows with rounds)."""
    low, high = 0, 1
    while task_epsilon(sampling_rate, noise_multiplier, steps, high, delta) <= budget:
        low, high = high, high * 2
        if high > 2**32:
            return 2**32 - 1  # no noise would be needed to stop a task this long
    while high - low > 1:
        middle = (low + high) // 2
        if task_epsilon(sampling_rate, noise_multiplier, steps, middle, delta) <= budget:
            low = middle
        else:
            high = middle
    return low
