"""Distributed DP's noise and its accounting: the Skellam sampler against the exact pmf, and
the Rényi-DP accountant against dp_accounting, the PLD accountant and hand-computed bounds."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedaiot.privacy.accounting import BudgetExhaustedError, epsilon_spent
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.privacy.rdp import (
    ORDERS,
    epsilon_composed,
    epsilon_from_rdp,
    gaussian_curve,
    plan_skellam_noise,
    rdp_gaussian,
    rdp_skellam,
    skellam_curve,
    subsampled_rdp,
)
from fedaiot.privacy.skellam import _log_poisson_pmf, sample_skellam

DELTA = 1e-5
DRAWS = 200_000
# Integer-domain sensitivities of a 10,000-parameter update clipped to 1 and scaled by 2**14.
L2 = 2.0**14
L1 = math.sqrt(10_000) * L2


def _chi_square_p(draws: np.ndarray, variance: float) -> float:
    """p-value of the draws against the symmetric Skellam pmf; the edge bins take the tails,
    and every bin expects at least 5."""
    mu = variance / 2
    reach = int(30 * math.sqrt(variance)) + 30
    support = np.arange(-reach, reach + 1)
    expected = len(draws) * stats.skellam.pmf(support, mu, mu)
    kept = support[expected >= 5]
    low, high = int(kept[0]), int(kept[-1])
    bins = np.concatenate([[-np.inf], np.arange(low, high) + 0.5, [np.inf]])
    observed, _ = np.histogram(draws, bins=bins)
    probabilities = np.diff(stats.skellam.cdf(bins, mu, mu))
    probabilities[0] = stats.skellam.cdf(low, mu, mu)
    probabilities[-1] = stats.skellam.sf(high - 1, mu, mu)
    expected = len(draws) * probabilities / probabilities.sum()
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("variance", [40.0, 6.0, 1000.0])  # PTRS, inversion, PTRS again
def test_skellam_draws_fit_the_exact_pmf(variance: float) -> None:
    draws = sample_skellam(SecureRandom(), DRAWS, variance)
    assert draws.dtype == np.int64 and draws.shape == (DRAWS,)
    assert _chi_square_p(draws, variance) > 1e-4


def test_large_variance_draws_have_the_right_moments() -> None:
    variance = 1e8
    draws = sample_skellam(SecureRandom(), DRAWS, variance).astype(np.float64)
    assert abs(draws.mean()) < 5 * math.sqrt(variance / DRAWS)
    assert abs(draws.var() / variance - 1) < 0.02
    # Skellam's excess kurtosis is 1 / variance: Gaussian to within the sampling error
    assert abs(stats.kurtosis(draws, fisher=False) - 3) < 0.06


@pytest.mark.parametrize("variance", [40.0, 400.0])
def test_shares_sum_to_the_central_noise(variance: float) -> None:
    randomness = SecureRandom()
    total = sum(sample_skellam(randomness, DRAWS, variance / 4) for _ in range(4))
    assert _chi_square_p(np.asarray(total), variance) > 1e-4


def test_draws_are_fresh_unless_seeded() -> None:
    first = sample_skellam(SecureRandom(), 1000, 1e6)
    second = sample_skellam(SecureRandom(), 1000, 1e6)
    assert not np.array_equal(first, second)
    again = [sample_skellam(SecureRandom.seeded(1), 1000, 1e6) for _ in range(2)]
    assert np.array_equal(*again)
    assert not np.array_equal(again[0], sample_skellam(SecureRandom.seeded(2), 1000, 1e6))


def test_degenerate_and_invalid_variances() -> None:
    assert np.array_equal(sample_skellam(SecureRandom(), 5, 0.0), np.zeros(5, dtype=np.int64))
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            sample_skellam(SecureRandom(), 5, bad)


@pytest.mark.parametrize("mean", [10.0, 57.3, 1e9, 1e12])
def test_poisson_log_pmf_is_exact_at_huge_means(mean: float) -> None:
    """The rejection test's log-pmf against 50-digit arithmetic, where the textbook formula
    would be off by ~1e-2 at mean 1e12."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    spread = math.sqrt(mean)
    k = np.floor(mean + spread * np.array([-8.0, -2.5, 0.0, 0.3, 3.0, 9.0])).clip(0) + 0.0
    ours = _log_poisson_pmf(k, mean)
    exact = [
        float(-mpmath.mpf(mean) + x * mpmath.log(mean) - mpmath.loggamma(x + 1)) for x in k.tolist()
    ]
    assert np.allclose(ours, exact, rtol=0, atol=1e-8)


def _dp_accounting_rdp(sigma: float, q: float) -> np.ndarray:
    accountant = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.rdp


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3, 5.0])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_subsampled_gaussian_matches_dp_accounting(sigma: float, q: float) -> None:
    theirs = _dp_accounting_rdp(sigma, q)
    assert np.allclose(gaussian_curve(sigma, q), theirs, rtol=1e-9, atol=0)
    for alpha in (2, 3, 17, 64):
        ours = subsampled_rdp(alpha, q, lambda j: rdp_gaussian(j, sigma))
        assert ours == pytest.approx(theirs[ORDERS.index(alpha)], rel=1e-9)


def test_general_subsampling_bound_by_hand() -> None:
    """Steinke's bound for a non-Gaussian base, evaluated term by term in plain floats."""
    q, alpha = 0.1, 5

    def base(j: int) -> float:
        return rdp_skellam(j, 1.0, 4.0, 16.0)

    direct = (1 - q) ** (alpha - 1) * (1 + (alpha - 1) * q) + sum(
        math.comb(alpha, j) * (1 - q) ** (alpha - j) * q**j * math.exp((j - 1) * base(j))
        for j in range(2, alpha + 1)
    )
    assert subsampled_rdp(alpha, q, base) == pytest.approx(math.log(direct) / (alpha - 1))
    assert subsampled_rdp(alpha, 1.0, base) == pytest.approx(base(alpha))
    assert subsampled_rdp(alpha, 0.0, base) == 0.0


def test_skellam_bound_by_hand() -> None:
    # mu = 100: 2 * 100 / 200 + min((2 * 2 * 100 + 6 * 30) / (4 * 100**2), 3 * 30 / 200)
    assert rdp_skellam(2, 1.0, 10.0, 30.0) == pytest.approx(1.0 + 0.0145)
    # mu = 1 < 2: the second branch of the min is the smaller, 2 * 100 / 2 + 3 * 30 / 2
    assert rdp_skellam(2, 0.1, 10.0, 30.0) == pytest.approx(100.0 + 45.0)
    assert rdp_skellam(2, 0.0, 10.0, 30.0) == math.inf


def test_skellam_at_a_fine_scale_costs_what_the_gaussian_costs() -> None:
    for sigma in (0.6, 1.0, 3.0):
        for alpha in (2, 10, 256, 512):
            gaussian = rdp_gaussian(alpha, sigma)
            skellam = rdp_skellam(alpha, sigma, L2, L1)
            assert gaussian <= skellam < gaussian * (1 + 1e-6)
        subsampled_g, subsampled_s = gaussian_curve(sigma, 0.1), skellam_curve(sigma, 0.1, L2, L1)
        assert np.all(subsampled_g <= subsampled_s)
        assert np.all(subsampled_s < subsampled_g * (1 + 1e-6))
    # at a coarse scale the Skellam's extra term is felt
    assert rdp_skellam(2, 1.0, 4.0, 16.0) > rdp_gaussian(2, 1.0) * 1.01


def test_large_orders_and_small_noise_do_not_overflow() -> None:
    curve = gaussian_curve(0.3, 0.5)
    assert np.all(np.isfinite(curve)) and np.all(np.diff(curve) >= 0)


@pytest.mark.parametrize(
    "history", [[(1.0, 0.1, 300)], [(3.58, 0.2, 150)], [(1.1, 0.1, 50), (2.3, 0.25, 12)]]
)
def test_gaussian_history_against_pld_and_dp_accounting(history: list) -> None:
    ours = epsilon_composed(history, [], DELTA)
    accountant = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(event, steps)
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)
    pld = epsilon_spent(history, DELTA)
    # RDP's conversion is the looser bound: 9 % above the PLD at (3.58, 0.2, 150), 15.5 % at
    # (1.0, 0.1, 300)
    assert pld <= ours < 1.2 * pld


def test_epsilon_conversion_matches_dp_accounting() -> None:
    orders = np.array(ORDERS, dtype=np.float64)
    for scale in (1e-12, 1e-4, 0.05, 3.0):
        rdp = scale * orders
        theirs, _ = dp_accounting.rdp.compute_epsilon(orders, rdp, DELTA)
        assert epsilon_from_rdp(rdp, ORDERS, DELTA) == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert epsilon_from_rdp([math.inf, math.inf], [2, 3], DELTA) == math.inf
    assert epsilon_composed([], [], DELTA) == 0.0


def _skellam_epsilon(sigma: float, spent: list, steps: int = 100) -> float:
    return epsilon_composed(spent, [(sigma, 0.1, steps, L2, L1)], DELTA)


def test_planned_skellam_noise_meets_the_budget_without_overshooting() -> None:
    sigma = plan_skellam_noise(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.1, steps=100, l2=L2, l1=L1
    )
    assert 3.0 * (1 - 2 * 0.005) < _skellam_epsilon(sigma, []) <= 3.0
    assert _skellam_epsilon(sigma * 0.98, []) > 3.0


def test_planned_skellam_noise_follows_budget_and_history() -> None:
    def plan(target: float, spent: list) -> float:
        return plan_skellam_noise(
            target_epsilon=target,
            delta=DELTA,
            sample_rate=0.1,
            steps=100,
            l2=L2,
            l1=L1,
            spent_gaussian=spent,
        )

    assert plan(6.0, []) < plan(4.0, []) < plan(2.0, [])
    spent = [(2.0, 0.1, 30)]
    with_history = plan(4.0, spent)
    assert with_history > plan(4.0, [])
    assert 4.0 * 0.99 < _skellam_epsilon(with_history, spent) <= 4.0


def test_skellam_planning_refuses_a_spent_budget() -> None:
    common = {"delta": DELTA, "sample_rate": 0.5, "steps": 50, "l2": L2, "l1": L1}
    with pytest.raises(BudgetExhaustedError, match="already spent"):
        plan_skellam_noise(target_epsilon=1.0, spent_gaussian=[(0.8, 0.5, 200)], **common)
    with pytest.raises(BudgetExhaustedError, match="already spent"):
        plan_skellam_noise(target_epsilon=1.0, spent_skellam=[(0.8, 0.5, 200, L2, L1)], **common)
    spent = [(1.0, 0.1, 100)]
    nearly_all = epsilon_composed(spent, [], DELTA) + 0.001
    with pytest.raises(BudgetExhaustedError, match="cannot pay for 50 steps"):
        plan_skellam_noise(target_epsilon=nearly_all, spent_gaussian=spent, **common)


def test_cached_curves_cannot_be_edited() -> None:
    with pytest.raises(ValueError):
        gaussian_curve(1.0, 0.1)[0] = 0.0


@pytest.mark.parametrize(("sigma", "shift", "q"), [(0.8, 3, 0.3), (1.5, 4, 0.1), (3.0, 2, 0.5)])
def test_the_subsampling_bound_covers_both_directions_of_a_skellam_step(
    sigma: float, shift: int, q: float
) -> None:
    """The binomial bound is an exact expansion of one direction (the record removed); the
    other direction (added) must lie below it too. Computed exactly on the 1-D Skellam."""
    from scipy import stats
    from scipy.special import logsumexp

    from fedaiot.privacy.rdp import rdp_skellam, subsampled_rdp

    variance = (sigma * shift) ** 2
    support = np.arange(-int(60 * math.sqrt(variance)) - 60, int(60 * math.sqrt(variance)) + 60)
    log_p = stats.skellam.logpmf(support, variance / 2, variance / 2)
    log_shifted = stats.skellam.logpmf(support - shift, variance / 2, variance / 2)
    finite = np.isfinite(log_p) & np.isfinite(log_shifted)  # tails below float range: ~0 mass
    log_p, log_shifted = log_p[finite], log_shifted[finite]
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_shifted)
    for alpha in range(2, 33):
        bound = subsampled_rdp(alpha, q, lambda j: rdp_skellam(j, sigma, shift, shift))
        removed = logsumexp(alpha * log_mix + (1 - alpha) * log_p) / (alpha - 1)
        added = logsumexp(alpha * log_p + (1 - alpha) * log_mix) / (alpha - 1)
        assert removed <= bound * (1 + 1e-9) + 1e-12, (alpha, removed, bound)
        assert added <= bound * (1 + 1e-9) + 1e-12, (alpha, added, bound)
