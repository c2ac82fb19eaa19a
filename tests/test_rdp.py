"""The device's RDP port (truscl.privacy.rdp) against dp-accounting's own results."""

import itertools
import logging
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import (
    DEFAULT_RDP_ORDERS,
    _compute_rdp_poisson_subsampled_gaussian,
)

from truscl.privacy.rdp import RDP_ORDERS, epsilon_from_rdp, rdp_poisson_subsampled_gaussian

SAMPLING_RATES = (1e-4, 256 / 60000, 0.05, 0.5, 1.0)
NOISE_MULTIPLIERS = (0.3, 0.7, 1.1, 5.0, 20.0)
STEPS = (1, 1_000, 100_000)
DELTAS = (1e-5, 1e-3)


@pytest.fixture(autouse=True)
def _quiet_absl() -> None:
    # dp-accounting logs every fractional order it leaves out (as the port does, silently)
    logging.getLogger("absl").setLevel(logging.ERROR)


def test_the_orders_are_dp_accountings_defaults() -> None:
    assert tuple(float(a) for a in DEFAULT_RDP_ORDERS) == RDP_ORDERS


@pytest.mark.parametrize(("q", "sigma"), list(itertools.product(SAMPLING_RATES, NOISE_MULTIPLIERS)))
def test_rdp_of_one_step_matches_dp_accounting_at_every_order(q: float, sigma: float) -> None:
    # Execute
    ours = rdp_poisson_subsampled_gaussian(q, sigma)
    theirs = _compute_rdp_poisson_subsampled_gaussian(q, sigma, DEFAULT_RDP_ORDERS)

    # Assert: the same orders diverge (inf), the rest agree to float precision of log-erfc
    assert [math.isinf(x) for x in ours] == [math.isinf(float(y)) for y in theirs]
    finite = [(x, float(y)) for x, y in zip(ours, theirs, strict=True) if not math.isinf(x)]
    assert finite, "every order diverged: the grid point tests nothing"
    for x, y in finite:
        assert x == pytest.approx(y, rel=1e-5, abs=1e-300)


@pytest.mark.parametrize(("q", "sigma"), list(itertools.product(SAMPLING_RATES, NOISE_MULTIPLIERS)))
def test_epsilon_of_many_steps_matches_the_rdp_accountant(q: float, sigma: float) -> None:
    one_step = rdp_poisson_subsampled_gaussian(q, sigma)
    for steps in STEPS:
        accountant = RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        for delta in DELTAS:
            # Execute
            ours, _ = epsilon_from_rdp(RDP_ORDERS, [steps * r for r in one_step], delta)

            # Assert
            assert ours == pytest.approx(accountant.get_epsilon(delta), rel=1e-6), (steps, delta)


def test_no_sampling_costs_nothing_and_no_noise_costs_everything() -> None:
    assert set(rdp_poisson_subsampled_gaussian(0.0, 1.0)) == {0.0}
    assert set(rdp_poisson_subsampled_gaussian(0.1, 0.0)) == {math.inf}
    assert epsilon_from_rdp(RDP_ORDERS, [math.inf] * len(RDP_ORDERS), 1e-5)[0] == math.inf


@pytest.mark.parametrize(("q", "sigma"), [(-0.1, 1.0), (1.5, 1.0), (0.1, -1.0)])
def test_out_of_range_terms_are_refused(q: float, sigma: float) -> None:
    with pytest.raises(ValueError):
        rdp_poisson_subsampled_gaussian(q, sigma)


def test_a_negative_delta_is_refused() -> None:
    with pytest.raises(ValueError):
        epsilon_from_rdp(RDP_ORDERS, [1.0] * len(RDP_ORDERS), -1e-5)
