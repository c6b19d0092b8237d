"""Rényi-DP accounting for histories that mix local Gaussian DP-SGD and distributed Skellam steps.

What the numbers mean. :func:`epsilon_composed` returns an epsilon such that the whole history
(every Gaussian and every Skellam step a data set ever took part in) is record-level
(epsilon, delta)-differentially private under add/remove-one neighbours: whoever sees every
release learns about the same with or without any one record. A Gaussian entry
``(sigma, q, steps)`` is DP-SGD with Gaussian noise ``sigma`` times the clipping norm on a
Poisson sample of rate ``q``; a Skellam entry ``(sigma, q, steps, l2, l1)`` is the same step
run as distributed DP: the integer sum leaving secure aggregation changes by at most ``l2`` in
L2 norm and ``l1`` in L1 norm with one record, and carries symmetric Skellam noise of variance
``(sigma * l2) ** 2`` per coordinate (the sum of the nodes' shares).

Three published results, composed by adding RDP order by order:

* the multi-dimensional Skellam mechanism's RDP (Agarwal, Kairouz & Liu, NeurIPS 2021);
* amplification by Poisson subsampling for any mechanism with integer-order RDP under
  add/remove neighbours (Steinke 2022, arXiv:2210.00597); for the Gaussian it is Mironov,
  Talwar & Zhang's (2019) formula, which the tests check against ``dp_accounting``;
* the conversion of RDP to (epsilon, delta) of Canonne, Kamath & Steinke (2020) and Balle et
  al. (2020), as ``dp_accounting`` applies it.

RDP composition is an upper bound looser than the privacy-loss-distribution accountant that
:mod:`fedaiot.privacy.accounting` uses for purely Gaussian local histories: for the same noise,
9 % more epsilon at (sigma 3.58, q 0.2, 150 steps), 15 % at (1.0, 0.1, 300), 39 % at
(1.0, 0.01, 300), all at delta 1e-5. It is used here because no tight numerical accountant
covers the Skellam mechanism. Never compare or subtract epsilons of the two accountants: a
history that gains a Skellam entry must be re-accounted as a whole here.

What the caller must do: keep one history per data set across every round, run and study,
Skellam and Gaussian entries together; plan the noise once per participation against the whole
history already spent (:func:`plan_skellam_noise`); make ``l2`` and ``l1`` hold for the
integers actually aggregated (after scaling and rounding, per record); and pick ``delta``
well below ``1 / n`` for ``n`` records.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from scipy import special

from fedaiot.privacy.accounting import smallest_noise

# (noise multiplier, sample rate, steps): the format of accounting.HistoryEntry.
GaussianEntry = tuple[float, float, int]
# (noise multiplier, sample rate, steps, integer L2 sensitivity, integer L1 sensitivity).
SkellamEntry = tuple[float, float, int, float, float]
# Orders above 256 only help at very large noise or delta; they cost little to carry.
ORDERS: tuple[int, ...] = (*range(2, 257), 320, 384, 512)

Array = npt.NDArray[np.float64]


def rdp_gaussian(alpha: int, sigma: float) -> float:
    """RDP at ``alpha`` of the Gaussian mechanism: sensitivity 1, noise ``sigma``."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return math.inf if sigma == 0 else alpha / (2.0 * sigma**2)


def rdp_skellam(alpha: int, sigma: float, l2: float, l1: float) -> float:
    """RDP at ``alpha`` of the multi-dimensional Skellam mechanism (Agarwal et al. 2021).

    With per-coordinate variance ``mu = (sigma * l2) ** 2``, their bound is
    ``alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu))``. Here
    ``2 alpha`` replaces ``2 alpha - 1``: a slightly larger, hence still valid, bound that leaves
    room for the exact constant of the theorem. The first term is the Gaussian's
    ``alpha / (2 sigma^2)``; the rest vanishes as ``l2`` (the integer scale) grows.
    """
    return float(_skellam_rdp(np.array([float(alpha)]), sigma, l2, l1)[0])


def _skellam_rdp(alpha: Array, sigma: float, l2: float, l1: float) -> Array:
    if sigma < 0 or l2 <= 0 or l1 < 0:
        raise ValueError(f"need sigma >= 0, l2 > 0, l1 >= 0; got {sigma}, {l2}, {l1}")
    if sigma == 0:
        return np.full(alpha.shape, math.inf)
    mu = (sigma * l2) ** 2
    excess = np.minimum((2.0 * alpha * l2**2 + 6.0 * l1) / (4.0 * mu**2), 3.0 * l1 / (2.0 * mu))
    return alpha * l2**2 / (2.0 * mu) + excess


@functools.lru_cache(maxsize=64)
def _tables(orders: tuple[int, ...]) -> tuple[Array, Array, Array, npt.NDArray[np.bool_]]:
    """log C(alpha, j), alpha - j, j and the mask 2 <= j <= alpha, one row per order."""
    alpha = np.array(orders, dtype=np.float64)[:, None]
    j = np.arange(max(orders) + 1, dtype=np.float64)[None, :]
    valid = (j >= 2) & (j <= alpha)
    rest = np.where(valid, alpha - j, 0.0)
    log_binomial = special.gammaln(alpha + 1) - special.gammaln(j + 1) - special.gammaln(rest + 1)
    return np.where(valid, log_binomial, -np.inf), rest, np.broadcast_to(j, valid.shape), valid


def _amplified(orders: tuple[int, ...], q: float, exponent: Array) -> Array:
    """Subsampled RDP at ``orders``, given ``exponent[j] = (j - 1) * base(j)`` for j = 0..max.

    Steinke's bound, ``exp((a-1) eps') <= (1-q)^(a-1) (1 + (a-1) q) + sum_{j>=2} C(a,j)
    (1-q)^(a-j) q^j exp((j-1) base(j))``, rewritten with the binomial identity as
    ``1 + sum_{j>=2} C(a,j) (1-q)^(a-j) q^j expm1((j-1) base(j))``: every term is positive,
    so the log-sum is exact even where the RDP is 1e-9 (log1p) and where it is 1e6 (log space).
    """
    a = np.array(orders, dtype=np.float64)
    if q == 0:
        return np.zeros(a.shape)
    if q == 1:
        return exponent[np.array(orders)] / (a - 1)
    log_binomial, rest, j, valid = _tables(orders)
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(expm1(x)) = x + log(1 - e^-x): no overflow at x ~ 1e6, exact at x ~ 1e-9
        log_excess = exponent + np.log(-np.expm1(-exponent))
        terms = log_binomial + j * math.log(q) + rest * math.log1p(-q) + log_excess[None, :]
        terms = np.where(valid, terms, -np.inf)
        log_sum = special.logsumexp(terms, axis=1)
    return np.logaddexp(0.0, log_sum) / (a - 1)


def subsampled_rdp(alpha: int, q: float, base: Callable[[int], float]) -> float:
    """RDP at integer ``alpha`` of ``base``'s mechanism run on a Poisson sample of rate ``q``.

    ``base(j)`` must be an RDP bound of the mechanism at every integer order ``2 <= j <= alpha``
    under add/remove neighbours (Steinke 2022, arXiv:2210.00597). For the Gaussian this is
    exactly the integer-order formula of Mironov, Talwar & Zhang (2019).
    """
    if alpha < 2 or int(alpha) != alpha:
        raise ValueError(f"alpha must be an integer >= 2, got {alpha}")
    if not 0 <= q <= 1:
        raise ValueError(f"sample rate must be in [0, 1], got {q}")
    alpha = int(alpha)
    exponent = np.zeros(alpha + 1)
    exponent[2:] = [(j - 1) * base(j) for j in range(2, alpha + 1)]
    return float(_amplified((alpha,), q, exponent)[0])


_J = np.arange(max(ORDERS) + 1, dtype=np.float64)


def _frozen(values: Array) -> Array:
    values.setflags(write=False)  # cached: a caller's edit must not change later results
    return values


def _check(sigma: float, q: float) -> None:
    if sigma < 0 or not 0 <= q <= 1:
        raise ValueError(f"need sigma >= 0 and q in [0, 1]; got {sigma}, {q}")


@functools.lru_cache(maxsize=4096)
def gaussian_curve(sigma: float, q: float) -> Array:
    """RDP at every order of :data:`ORDERS` of one Poisson-subsampled Gaussian step."""
    _check(sigma, q)
    if sigma == 0 and q > 0:
        return _frozen(np.full(len(ORDERS), math.inf))
    exponent = np.zeros_like(_J) if sigma == 0 else (_J - 1) * _J / (2.0 * sigma**2)
    return _frozen(_amplified(ORDERS, q, exponent))


@functools.lru_cache(maxsize=4096)
def skellam_curve(sigma: float, q: float, l2: float, l1: float) -> Array:
    """RDP at every order of :data:`ORDERS` of one Poisson-subsampled Skellam step."""
    _check(sigma, q)
    if sigma == 0 and q > 0:
        return _frozen(np.full(len(ORDERS), math.inf))
    exponent = np.zeros_like(_J) if sigma == 0 else (_J - 1) * _skellam_rdp(_J, sigma, l2, l1)
    return _frozen(_amplified(ORDERS, q, exponent))


def epsilon_from_rdp(rdp: Sequence[float] | Array, orders: Sequence[int], delta: float) -> float:
    """The smallest epsilon any order's RDP gives at ``delta`` (never negative).

    ``rdp(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1)``: Canonne, Kamath & Steinke
    (2020, Prop. 12), Balle et al. (2020). Where the RDP is so small that
    ``delta^2 >= 1 - exp(-rdp)``, epsilon is 0: Kullback-Leibler is at most any RDP, and the
    Bretagnolle-Huber inequality bounds total variation by ``sqrt(1 - exp(-KL))``. Both are
    what ``dp_accounting.rdp.compute_epsilon`` does.
    """
    values = np.asarray(rdp, dtype=np.float64)
    a = np.asarray(orders, dtype=np.float64)
    if values.shape != a.shape or values.ndim != 1 or not values.size:
        raise ValueError("rdp and orders must be non-empty and of the same length")
    if np.any(a <= 1):
        raise ValueError("Rényi orders must be > 1")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    with np.errstate(invalid="ignore", over="ignore"):
        eps = values + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1)
        eps = np.where(delta**2 + np.expm1(-values) > 0, 0.0, eps)
    best = float(np.min(eps))
    return math.inf if math.isnan(best) else max(0.0, best)


def _keys(
    gaussian: Sequence[GaussianEntry], skellam: Sequence[SkellamEntry]
) -> tuple[tuple[GaussianEntry, ...], tuple[SkellamEntry, ...]]:
    g = tuple((float(s), float(q), int(n)) for s, q, n in gaussian)
    k = tuple((float(s), float(q), int(n), float(l2), float(l1)) for s, q, n, l2, l1 in skellam)
    if any(entry[2] < 0 for entry in (*g, *k)):
        raise ValueError("steps must be >= 0")
    return g, k


def epsilon_composed(
    gaussian: Sequence[GaussianEntry], skellam: Sequence[SkellamEntry], delta: float
) -> float:
    """Epsilon at ``delta`` of every entry composed (0 for an empty history), with RDP."""
    return _epsilon_composed(*_keys(gaussian, skellam), float(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon_composed(
    gaussian: tuple[GaussianEntry, ...], skellam: tuple[SkellamEntry, ...], delta: float
) -> float:
    """Every node of a run composes the same few histories, and planning bisects through the
    same ones for every node: a process computes each once."""
    total = np.zeros(len(ORDERS))
    for sigma, q, steps in gaussian:
        if steps:  # 0 * inf (no noise, never run) is no cost, not NaN
            total += steps * gaussian_curve(sigma, q)
    for sigma, q, steps, l2, l1 in skellam:
        if steps:
            total += steps * skellam_curve(sigma, q, l2, l1)
    if not total.any():
        return 0.0
    return epsilon_from_rdp(total, ORDERS, delta)


def plan_skellam_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    l2: float,
    l1: float,
    spent_gaussian: Sequence[GaussianEntry] = (),
    spent_skellam: Sequence[SkellamEntry] = (),
    tolerance: float = 0.005,
    max_noise: float = 50.0,
) -> float:
    """The smallest Skellam noise multiplier whose ``steps`` after the spent history fit.

    Bisection over sigma on the composed history: the result never overshoots
    ``target_epsilon`` and lies within ``tolerance`` (relative) of the smallest sigma that
    fits. A remainder of budget so small that it needs more noise than ``max_noise`` counts as
    exhausted, as in :func:`fedaiot.privacy.accounting.plan_noise`.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if l2 <= 0 or l1 < 0:
        raise ValueError(f"need l2 > 0 and l1 >= 0, got {l2}, {l1}")
    gaussian, skellam = _keys(spent_gaussian, spent_skellam)

    def total(sigma: float) -> float:
        entry = (float(sigma), float(sample_rate), int(steps), float(l2), float(l1))
        return _epsilon_composed(gaussian, (*skellam, entry), float(delta))

    return smallest_noise(
        total,
        already=_epsilon_composed(gaussian, skellam, float(delta)),
        target_epsilon=target_epsilon,
        what=f"{steps} steps at sample rate {sample_rate:.3g}",
        tolerance=tolerance,
        max_noise=max_noise,
    )
