"""Rényi DP of the Poisson-subsampled Gaussian mechanism, and its conversion to (epsilon, delta).

A port of the few functions of dp-accounting 0.6.0 (``dp_accounting.rdp.rdp_privacy_accountant``,
Apache 2.0) that a device needs: the RDP of one DP-SGD step at every order of
``DEFAULT_RDP_ORDERS`` (Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the
Sampled Gaussian Mechanism": the integer orders by the binomial expansion, the fractional ones by
the two-sided series of its section 3.3), and ``compute_epsilon``'s conversion (Balle et al. 2020,
Proposition 12). Importing dp-accounting takes seconds on a Pi (it loads scipy and its PLD
module), so the device runs this port, on the standard library alone; the same orders and the
same arithmetic give the same figures, which tests/test_rdp.py checks against dp-accounting's
own ``RdpAccountant`` over a grid of sampling rates, noise multipliers and step counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# dp-accounting's DEFAULT_RDP_ORDERS: fine steps where small orders win (much noise, few steps),
# then the integers, then a few large orders for nearly noiseless runs.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(11, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
)
_MAX_STEPS_LOG_A_FRAC = 1000


def rdp_poisson_subsampled_gaussian(
    q: float, noise_multiplier: float, orders: Sequence[float] = RDP_ORDERS
) -> tuple[float, ...]:
    """RDP at each order of one step: Poisson sampling at rate ``q``, then Gaussian noise of
    ``noise_multiplier`` times the sensitivity (``inf`` where it diverges)."""
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be non-negative, got {noise_multiplier}")

    def one_order(alpha: float) -> float:
        if q == 0:
            return 0.0
        if math.isinf(alpha) or noise_multiplier == 0:
            return math.inf
        if q == 1.0:
            return alpha / (2 * noise_multiplier**2)
        if float(alpha).is_integer():
            log_a = _log_a_int(q, noise_multiplier, int(alpha))
        else:
            log_a = _log_a_frac(q, noise_multiplier, alpha)
        return log_a / (alpha - 1)

    return tuple(one_order(alpha) for alpha in orders)


def epsilon_from_rdp(
    orders: Sequence[float], rdp: Sequence[float], delta: float
) -> tuple[float, float]:
    """The smallest epsilon over ``orders`` at ``delta``, and the order that gives it."""
    if delta < 0:
        raise ValueError(f"delta cannot be negative, got {delta}")
    if len(orders) != len(rdp):
        raise ValueError("orders and rdp must have the same length")
    if delta == 0:
        return (0.0, 0.0) if all(r == 0 for r in rdp) else (math.inf, 0.0)
    best, best_order = math.inf, orders[0]
    for alpha, r in zip(orders, rdp, strict=True):
        if alpha < 1:
            raise ValueError(f"a Rényi order is at least 1, got {alpha}")
        if r < 0:
            epsilon = 0.0  # numerical trouble of an extreme event: dp-accounting says 0 too
        elif delta**2 + math.expm1(-r) > 0:
            epsilon = 0.0  # the KL bound alone gives delta
        elif alpha > 1.01:
            epsilon = r + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)
        else:
            epsilon = math.inf
        if epsilon < best:  # the first of equal minima, as numpy's argmin
            best, best_order = epsilon, alpha
    return max(0.0, best), best_order


def _log_add(log_x: float, log_y: float) -> float:
    a, b = min(log_x, log_y), max(log_x, log_y)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_comb(n: float, k: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    log_q, log_1mq = math.log(q), math.log1p(-q)
    for i in range(alpha + 1):
        log_coef = _log_comb(alpha, i) + i * log_q + (alpha - i) * log_1mq
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """Sec. 3.3 of arXiv:1908.10530: two integrals split at ``z0``, summed term by term until
    both series decrease and their terms are e^30 below the total."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    last_s0 = last_s1 = -math.inf
    for i in range(_MAX_STEPS_LOG_A_FRAC):
        log_coef = _log_comb(alpha, i)
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        log_a0 = _log_add(log_a0, log_s0)
        log_a1 = _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    return math.inf  # no convergence: the order is left out, as dp-accounting does


def _log_erfc(x: float) -> float:
    """log(erfc(x)), with the asymptotic series where erfc underflows (x above ~26)."""
    r = math.erfc(x)
    if r > 0.0:
        return math.log(r)
    return (
        -math.log(math.pi) / 2
        - math.log(x)
        - x**2
        - 0.5 * x**-2
        + 0.625 * x**-4
        - 37.0 / 24.0 * x**-6
        + 353.0 / 64.0 * x**-8
    )
