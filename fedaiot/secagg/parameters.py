"""SecAgg+'s degree ``k`` and threshold ``t``, chosen from a stated threat model.

Bell et al. (CCS 2020) pick the graph's degree and the Shamir threshold so that, except with
probability ``2^-sigma``, the coordinator learns nothing beyond the sum, and, except with
probability ``2^-eta``, the round completes. :func:`choose` does the same for fedaiot's graph (a
Harary ring of even degree ``k`` over a permutation drawn from the round nonce; complete graph
for ``k = n - 1``) and returns the smallest degree that meets both.

The threat model. ``n`` nodes are in the round; at most ``C = floor(gamma * n)`` of them collude
with an honest-but-curious coordinator, and at most ``D = floor(delta * n)`` drop out at any
stage. Both sets are fixed *before* the round nonce is drawn (a static adversary, and dropouts
that do not depend on the graph), so, for any one node, its ``k`` neighbours are a uniformly
random ``k``-subset of the other ``n - 1`` nodes, and the removed set ``C u D`` sits on uniformly
random ring positions. Corrupt nodes follow the protocol (they do not drop out beyond ``D``).

The bounds (union bounds over nodes; ``Hyp(N, K, k)`` counts the marked nodes among ``k`` drawn
without replacement from ``N`` of which ``K`` are marked; tails are summed exactly in log space):

* *exposure*: an honest node with ``t`` corrupt share holders gives the coalition both its
  self-mask seed and its mask key, hence its input:
  ``(n - C) * P[Hyp(n - 1, C, k) >= t]``.
* *disconnection*: if the honest survivors' induced subgraph splits, the coordinator learns each
  part's sum. Removing a set ``R`` from the ring ``C_n(1..k/2)`` disconnects it only if ``R``
  contains two maximal runs of at least ``h = k/2`` consecutive positions (a shorter gap is
  bridged by an edge, and arcs split by at most one long gap stay joined around the other way),
  so it needs ``|R| >= k``: never when ``|R| < k`` (``k``-connectivity). Otherwise, for the
  ``n (n - k - 1) / 2`` pairs of ``h``-windows with at least one position between them on each
  side, each fully removed with probability ``(r)_k / (n)_k`` (falling factorials):
  ``P <= n (n - k - 1) / 2 * (r)_k / (n)_k`` with ``r = min(n, C + D)`` (the bound grows with
  ``r``, so overlapping ``C`` and ``D`` can only help). Zero for the complete graph.
* *correctness*: a surviving node needs ``t`` surviving holders among its ``k`` neighbours and
  itself, a dropped one ``t`` among its neighbours: ``(n - D) * P[Hyp(n - 1, D, k) >= k - t + 2]
  + D * P[Hyp(n - 1, D - 1, k) >= k - t + 1]``, plus the disconnection bound with ``r = D`` (the
  survivors must stay connected, else nodes and the coordinator refuse to unmask).

Security is ``exposure + disconnection <= 2^-sigma``; correctness is the last line ``<= 2^-eta``.
The disconnection bound assumes the removed set is independent of the graph; the server's pruning
of nodes left with fewer than ``t - 1`` live neighbours breaks that, but it fires only inside the
correctness-failure event (probability ``<= 2^-eta``), so a round in which it fires is outside the
``2^-sigma`` claim for partial sums (exposure of single inputs is unaffected).

What the caller must do: state ``gamma`` and ``delta`` honestly for the whole round (a dropout
the adversary times after seeing the graph, or more colluders than ``gamma * n``, voids the
bound); put the returned degree and threshold into the round's
:class:`~fedaiot.secagg.setup.RoundSetup`; draw the round nonce fresh and at random (a server
that grinds nonces picks the graph); and re-run :func:`choose` when ``n`` changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from fedaiot.secagg.errors import SecAggError
from fedaiot.secagg.graph import check_degree

MIN_SECURITY_BITS = 40
_NEG_INF = -math.inf
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class SecAggParameters:
    """A degree and threshold with the bounds they were chosen to meet.

    ``log2_security_failure`` bounds (log2) the probability that the coordinator, with its
    colluders, learns more than the sum; ``log2_correctness_failure`` bounds that of a round
    that cannot finish. ``-inf`` means the event is impossible under the threat model.
    """

    degree: int
    threshold: int
    log2_security_failure: float
    log2_correctness_failure: float
    n: int
    collusion: float
    dropout: float
    security_bits: float
    correctness_bits: float

    @property
    def complete(self) -> bool:
        """Whether the graph is complete (every node is every other's neighbour)."""
        return self.degree == self.n - 1

    def to_dict(self) -> dict[str, int | float | bool | None]:
        """JSON-safe fields for the journal; a bound of probability 0 (``-inf``) becomes null."""

        def finite(x: float) -> float | None:
            return None if x == _NEG_INF else x

        return {
            "degree": self.degree,
            "threshold": self.threshold,
            "complete": self.complete,
            "log2_security_failure": finite(self.log2_security_failure),
            "log2_correctness_failure": finite(self.log2_correctness_failure),
            "n": self.n,
            "collusion": self.collusion,
            "dropout": self.dropout,
            "security_bits": self.security_bits,
            "correctness_bits": self.correctness_bits,
        }


@lru_cache(maxsize=16)
def _log_factorials(n: int) -> tuple[float, ...]:
    return tuple(math.lgamma(i + 1) for i in range(n + 1))


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _log_tails(pop: int, marked: int, draws: int, lowest: int) -> list[float]:
    """``out[x - lowest] = ln P[X >= x]`` for ``lowest <= x <= draws + 1``, X ~ Hyp(pop,
    marked, draws); the upper tail is summed from its far end, so tiny tails stay exact."""
    lf = _log_factorials(pop)
    lo, hi = max(0, draws - pop + marked), min(draws, marked)
    const = lf[marked] + lf[pop - marked] + lf[draws] + lf[pop - draws] - lf[pop]
    out = [_NEG_INF] * (draws + 2 - lowest)
    acc = _NEG_INF
    for x in range(draws + 1, lowest - 1, -1):
        if lo <= x <= hi:
            term = const - lf[x] - lf[marked - x] - lf[draws - x] - lf[pop - marked - draws + x]
            acc = _logaddexp(acc, term)
        out[x - lowest] = 0.0 if x <= lo else min(acc, 0.0)
    return out


def _log_disconnection(n: int, k: int, removed: int) -> float:
    """ln of the bound (module docstring) on the ring minus ``removed`` random nodes splitting."""
    if k >= n - 1 or removed < k:
        return _NEG_INF
    lf = _log_factorials(n)
    pairs = math.log(n * (n - k - 1) / 2)
    return min(0.0, pairs + lf[removed] - lf[removed - k] - lf[n] + lf[n - k])


def _count(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 1e-9)  # 0.29 * 100 is 28.999...: count 29


def _check_inputs(n: int, collusion: float, dropout: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise SecAggError(f"secure aggregation needs an integer n >= 3 nodes, got {n!r}")
    if not 0 <= collusion < 1:
        raise SecAggError(f"collusion (gamma) must be in [0, 1), got {collusion!r}")
    if not 0 <= dropout < 1:
        raise SecAggError(f"dropout (delta) must be in [0, 1), got {dropout!r}")


def node_exposure_probability(n: int, degree: int, threshold: int, collusion: float) -> float:
    """Probability that *one given* honest node has ``threshold`` or more corrupt neighbours
    (so the coalition holds both of its secrets), with ``floor(collusion * n)`` colluders
    fixed before the round's permutation is drawn."""
    _check_inputs(n, collusion, 0.0)
    check_degree(n, degree)
    if not 1 <= threshold <= degree + 1:
        raise SecAggError(f"threshold {threshold} must be in [1, {degree + 1}]")
    c = _count(collusion, n)
    return math.exp(_log_tails(n - 1, c, degree, threshold)[0])


def exposure_probability(n: int, degree: int, threshold: int, collusion: float) -> float:
    """Union bound, capped at 1, on the probability that *some* honest node is exposed:
    ``(n - C) * node_exposure_probability(...)``. Before the cap it is the expected number of
    exposed honest nodes, so a value of 1 means exposure is to be expected, not excluded."""
    p = node_exposure_probability(n, degree, threshold, collusion)
    return min(1.0, (n - _count(collusion, n)) * p)


def choose(
    n: int,
    *,
    collusion: float,
    dropout: float,
    security_bits: float = MIN_SECURITY_BITS,
    correctness_bits: float = 20,
) -> SecAggParameters:
    """The smallest valid degree, and the smallest threshold for it, meeting the threat model.

    Guarantee: if at most ``collusion * n`` nodes collude with an honest-but-curious coordinator
    and at most ``dropout * n`` drop out, both sets fixed independently of the round nonce, then
    with the returned ``degree`` and ``threshold`` the coordinator learns more than the sum of
    the honest survivors' inputs with probability at most ``2^-security_bits``, and the round
    fails for lack of shares or connectivity with probability at most ``2^-correctness_bits``
    (the bounds are in the module docstring). Degrees are tried in the order RoundSetup allows
    (even ``2..n-2``, then ``n - 1``, the complete graph); the smallest secure threshold above
    ``(degree + 1) / 2`` is kept, as it leaves the most room for dropouts. Larger ``collusion``
    or ``dropout`` does not lower the degree (each bound grows with them; tested on a grid).

    Raises :class:`SecAggError` for ``n < 3``, ``collusion`` or ``dropout`` outside ``[0, 1)``,
    ``security_bits < 40`` or ``correctness_bits <= 0``, and when even the complete graph cannot
    meet the bounds (it needs ``C < t <= n - D`` with ``t > n / 2``).
    """
    _check_inputs(n, collusion, dropout)
    if not security_bits >= MIN_SECURITY_BITS or math.isinf(security_bits):
        raise SecAggError(f"security_bits must be finite and >= 40, got {security_bits!r}")
    if not correctness_bits > 0 or math.isinf(correctness_bits):
        raise SecAggError(f"correctness_bits must be finite and > 0, got {correctness_bits!r}")
    c, d = _count(collusion, n), _count(dropout, n)
    sec_budget, cor_budget = -security_bits * _LN2, -correctness_bits * _LN2
    log_honest, log_live, log_dropped = math.log(n - c), math.log(n - d), math.log(max(d, 1))
    for k in [*range(2, n - 1, 2), n - 1]:
        disc_sec = _log_disconnection(n, k, min(n, c + d))
        disc_cor = _log_disconnection(n, k, d)
        if disc_sec > sec_budget or disc_cor > cor_budget:
            continue
        t_min = (k + 1) // 2 + 1
        exposed = _log_tails(n - 1, c, k, t_min)
        t = next(
            (
                t
                for t in range(t_min, k + 2)
                if _logaddexp(log_honest + exposed[t - t_min], disc_sec) <= sec_budget
            ),
            None,
        )
        if t is None:
            continue
        short = log_live + _log_tails(n - 1, d, k, k - t + 2)[0]
        if d:
            short = _logaddexp(short, log_dropped + _log_tails(n - 1, d - 1, k, k - t + 1)[0])
        correctness = _logaddexp(short, disc_cor)
        if correctness <= cor_budget:
            security = _logaddexp(log_honest + exposed[t - t_min], disc_sec)
            return SecAggParameters(
                degree=k,
                threshold=t,
                log2_security_failure=security / _LN2,
                log2_correctness_failure=correctness / _LN2,
                n=n,
                collusion=collusion,
                dropout=dropout,
                security_bits=security_bits,
                correctness_bits=correctness_bits,
            )
    raise SecAggError(
        f"no SecAgg+ degree and threshold meet n={n}, collusion={collusion} "
        f"({c} colluders), dropout={dropout} ({d} dropouts), security_bits={security_bits}, "
        f"correctness_bits={correctness_bits}: even the complete graph needs a threshold t "
        f"with {c} < t <= {n - d} and t > {n / 2:g}"
    )
