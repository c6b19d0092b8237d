"""Integer noise for distributed DP: exact symmetric Skellam draws from :class:`SecureRandom`.

The guarantee. :func:`sample_skellam` returns independent draws of the symmetric Skellam
distribution of variance ``v``, the law of ``X - Y`` for independent ``X, Y ~ Poisson(v / 2)``.
The sum of independent symmetric Skellams is again symmetric Skellam, with the variances added:
exactly, not approximately (sums of independent Poissons are Poisson). This is why it is the
noise of distributed DP: if each of ``n`` nodes adds a share of variance ``v / n`` to its
integer update inside secure aggregation, the unmasked sum carries exactly the Skellam noise of
variance ``v`` that the central Skellam mechanism (Agarwal, Kairouz & Liu 2021) accounts for,
while no one, the coordinator included, ever sees a single node's update with less noise than
its own share. The draws are exact in distribution up to the 53-bit resolution of the
uniforms: Poisson variates come from inversion of the survival function for means below 10,
and from Hörmann's PTRS transformed rejection (Hörmann 1993) above, whose acceptance test is
evaluated in a form that does not lose precision at means up to 1e12.

Every uniform comes from ``randomness.uniform``, a ChaCha20 keystream: nothing here touches
numpy's or torch's generators, whose state an observer could reconstruct.

What the caller must do for this to hold:

* use a fresh :class:`~fedaiot.privacy.randomness.SecureRandom` per round, never shared
  between nodes (a seeded one only for runs whose results are marked not private);
* never log, store or send the draws, nor the update before they are added: the noise protects
  records only as long as it stays unknown;
* count on the variance only of the *sum* of shares that arrives: a node that drops out takes
  its share with it, so plan the shares for the nodes that may drop (or account for the less
  noise that remains).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import special

from fedaiot.privacy.randomness import SecureRandom

# Hörmann proves PTRS's hat dominates the Poisson law for means of at least 10.
PTRS_MIN_MEAN = 10.0
# SecureRandom.uniform returns (w + 1/2) * 2**-53 for 53-bit words w: never less than this.
_SMALLEST_UNIFORM = 2.0**-54
# For means below 10, P(X > 80) < 1e-50: a table this long holds every reachable outcome.
_INVERSION_TABLE = 81
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def sample_skellam(randomness: SecureRandom, size: int, variance: float) -> npt.NDArray[np.int64]:
    """``size`` independent symmetric Skellam draws of mean 0 and variance ``variance``."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not math.isfinite(variance) or variance < 0:
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    if variance == 0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    both = sample_poisson(randomness, 2 * size, variance / 2)
    return both[:size] - both[size:]


def sample_poisson(randomness: SecureRandom, size: int, mean: float) -> npt.NDArray[np.int64]:
    """``size`` independent Poisson draws of ``mean``, all uniforms from ``randomness``."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not math.isfinite(mean) or mean < 0:
        raise ValueError(f"mean must be finite and >= 0, got {mean}")
    if mean == 0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    if mean < PTRS_MIN_MEAN:
        return _poisson_inversion(randomness, size, mean)
    return _poisson_ptrs(randomness, size, mean)


def _poisson_inversion(randomness: SecureRandom, size: int, mean: float) -> npt.NDArray[np.int64]:
    """Inversion on the survival function: ``X = #{k >= 0 : U < P(X > k)}``.

    The events ``U < P(X > k)`` are nested, so ``P(X >= k + 1) = P(X > k)`` exactly. Working
    from the upper tail (``pdtrc``, accurate far into it) rather than summing the pmf keeps the
    tail probabilities exact instead of as ``1 - cdf`` rounded to 1e-16."""
    survival = special.pdtrc(np.arange(_INVERSION_TABLE), mean)
    # Outcomes with P(X > k) <= 2**-54 are unreachable by a 53-bit uniform in either form.
    survival = survival[survival > _SMALLEST_UNIFORM]
    uniforms = randomness.uniform(size)
    # -survival ascends, so the count of entries below -u is the count of survival > u.
    return np.searchsorted(-survival, -uniforms, side="left").astype(np.int64)


def _poisson_ptrs(randomness: SecureRandom, size: int, mean: float) -> npt.NDArray[np.int64]:
    """Hörmann's PTRS, vectorised: propose for every pending draw, keep the accepted ones,
    propose again for the rest (about 10 % per pass at these means, so a handful of passes)."""
    root = math.sqrt(mean)
    b = 0.931 + 2.53 * root
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    # k = floor(x + mean + 0.43) with mean ~ 1e12 would round x to 1e-4; splitting off the
    # integer part keeps the proposal's cell boundaries at full precision.
    whole = math.floor(mean)
    fraction = mean - whole
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        n = pending.size
        uniforms = randomness.uniform(2 * n)
        u = uniforms[:n] - 0.5
        v = uniforms[n:]
        us = 0.5 - np.abs(u)
        offset = np.floor((2.0 * a / us + b) * u + fraction + 0.43)
        k = whole + offset
        accept = (us >= 0.07) & (v <= v_r)  # the squeeze: inside the pmf without evaluating it
        undecided = ~accept & (k >= 0) & ~((us < 0.013) & (v > us))
        if undecided.any():
            idx = np.flatnonzero(undecided)
            hat = np.log(v[idx]) + log_inv_alpha - np.log(a / (us[idx] * us[idx]) + b)
            accept[idx] = hat <= _log_poisson_pmf(k[idx], mean)
        out[pending[accept]] = k[accept].astype(np.int64)
        pending = pending[~accept]
    return out


def _log_poisson_pmf(k: npt.NDArray[np.float64], mean: float) -> npt.NDArray[np.float64]:
    """``log P(X = k)`` via Loader's saddle-point form.

    The textbook ``-mean + k log(mean) - log(k!)`` cancels terms of size ``mean * log(mean)``
    and at mean 1e12 leaves an error of ~1e-2 in the acceptance test; the deviance
    ``k log(k / mean) + mean - k`` computed through ``log1p`` is exact to ~|k - mean| * 1e-16.
    """
    out = np.full(k.shape, -mean)
    positive = k > 0
    kk = k[positive]
    t = (kk - mean) / mean
    deviance = mean * ((1.0 + t) * np.log1p(t) - t)
    out[positive] = -deviance - _HALF_LOG_2PI - 0.5 * np.log(kk) - _stirling_error(kk)
    return out


def _stirling_error(n: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``log(n!) - (n log n - n + log(2 pi n) / 2)`` for ``n >= 1``.

    Small ``n``: from ``gammaln`` (no cancellation at that size). Large ``n``: the Stirling
    series, whose first omitted term is below 1e-16 for ``n > 15``, where ``gammaln``'s
    difference would cancel digits."""
    out = np.empty_like(n)
    small = n <= 15
    ns = n[small]
    out[small] = special.gammaln(ns + 1) - (ns * np.log(ns) - ns + _HALF_LOG_2PI + 0.5 * np.log(ns))
    r = 1.0 / n[~small]
    r2 = r * r
    out[~small] = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 * (1 / 1680 - r2 / 1188))))
    return out
