"""Choosing SecAgg+'s degree and threshold from a threat model (fedaiot.secagg.parameters).

The bounds are recomputed here independently, in exact rational arithmetic (math.comb and
Fraction), and their two probabilistic ingredients are checked on the real graph: a node's
corrupt-neighbour count is hypergeometric (Monte Carlo over round nonces), and the ring's
disconnection bound holds (every removed set enumerated).
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest

from fedaiot.secagg import RoundSetup, SecAggError
from fedaiot.secagg.graph import components, neighbours
from fedaiot.secagg.parameters import (
    SecAggParameters,
    _log_disconnection,
    choose,
    exposure_probability,
    node_exposure_probability,
)

MODELS = [(0.0, 0.0), (0.1, 0.05), (0.2, 0.1), (1 / 3, 0.2), (0.1, 0.3)]


def tail(pop: int, marked: int, draws: int, at_least: int) -> Fraction:
    """P[Hyp(pop, marked, draws) >= at_least], exactly."""
    num = sum(
        math.comb(marked, x) * math.comb(pop - marked, draws - x)
        for x in range(max(at_least, 0), draws + 1)
    )
    return Fraction(num, math.comb(pop, draws))


def disconnection(n: int, k: int, removed: int) -> Fraction:
    """The module's ring bound, recomputed: n(n-k-1)/2 * (r)_k / (n)_k, 0 if r < k."""
    if k >= n - 1 or removed < k:
        return Fraction(0)
    ratio = Fraction(math.perm(removed, k), math.perm(n, k))
    return min(Fraction(1), Fraction(n * (n - k - 1), 2) * ratio)


def bounds(n: int, k: int, t: int, gamma: float, delta: float) -> tuple[Fraction, Fraction]:
    c, d = math.floor(gamma * n + 1e-9), math.floor(delta * n + 1e-9)
    security = (n - c) * tail(n - 1, c, k, t) + disconnection(n, k, min(n, c + d))
    correctness = (n - d) * tail(n - 1, d, k, k - t + 2) + disconnection(n, k, d)
    if d:
        correctness += d * tail(n - 1, d - 1, k, k - t + 1)
    return security, correctness


def log2(p: Fraction) -> float:
    return -math.inf if p == 0 else math.log2(p.numerator) - math.log2(p.denominator)


@pytest.mark.parametrize("gamma,delta", MODELS)
def test_choice_is_a_valid_round_setup(gamma: float, delta: float) -> None:
    for n in [*range(3, 41), 64, 99, 100, 101, 255, 500, 999, 1000, 2000]:
        p = choose(n, collusion=gamma, dropout=delta)
        assert (p.degree + 1) / 2 < p.threshold <= p.degree + 1
        assert p.log2_security_failure <= -40 and p.log2_correctness_failure <= -20
        setup = RoundSetup(
            round_id=1,
            round_nonce=bytes(32),
            node_ids=list(range(n)),
            threshold=p.threshold,
            degree=p.degree,
            vector_length=1,
        )
        assert (setup.degree, setup.threshold) == (p.degree, p.threshold)


@pytest.mark.parametrize(
    "n,gamma,delta", [(30, 0.4, 0.1), (60, 1 / 3, 0.2), (100, 1 / 3, 0.05), (150, 0.1, 0.2)]
)
def test_bounds_hold_and_degree_is_minimal(n: int, gamma: float, delta: float) -> None:
    p = choose(n, collusion=gamma, dropout=delta)
    security, correctness = bounds(n, p.degree, p.threshold, gamma, delta)
    assert security <= Fraction(1, 2**40) and correctness <= Fraction(1, 2**20)
    assert p.log2_security_failure == pytest.approx(log2(security), abs=1e-6)
    assert p.log2_correctness_failure == pytest.approx(log2(correctness), abs=1e-6)
    for k in range(2, min(p.degree, n - 1), 2):  # no smaller degree, with any threshold, fits
        for t in range((k + 1) // 2 + 1, k + 2):
            s, c = bounds(n, k, t, gamma, delta)
            assert s > Fraction(1, 2**40) or c > Fraction(1, 2**20), (k, t)


def test_exposure_matches_the_real_graph() -> None:
    """Corrupt nodes fixed first, then 2000 nonces: the exposure rates match the bound."""
    n, k, gamma, trials = 40, 10, 0.4, 2000
    ids, corrupt = list(range(n)), set(range(16))
    counts: list[list[int]] = []
    for trial in range(trials):
        graph = neighbours(ids, k, trial.to_bytes(32, "big"))
        counts.append([len(graph[u] & corrupt) for u in ids if u not in corrupt])
    for t in (7, 8):
        per_node = node_exposure_probability(n, k, t, gamma)
        assert per_node == pytest.approx(float(tail(n - 1, 16, k, t)), rel=1e-9)
        pooled = sum(x >= t for row in counts for x in row) / (trials * (n - 16))
        assert abs(pooled - per_node) < 5 * math.sqrt(per_node / (trials * (n - 16))) + 1e-3
        some = sum(max(row) >= t for row in counts) / trials
        assert some <= exposure_probability(n, k, t, gamma) - (0.2 if t == 7 else 0.0)
    chosen = choose(n, collusion=gamma, dropout=0.1)  # the chosen pair: no exposure at all
    for trial in range(200):
        graph = neighbours(ids, chosen.degree, trial.to_bytes(32, "little"))
        assert all(len(graph[u] & corrupt) < chosen.threshold for u in ids if u not in corrupt)


@pytest.mark.parametrize("n,k", [(12, 4), (14, 6), (13, 2)])
def test_disconnection_bound_over_every_removed_set(n: int, k: int) -> None:
    graph = neighbours(list(range(n)), k, b"\x07" * 32)
    for r in range(n + 1):
        split = sum(
            len(components(graph, set(range(n)) - set(gone))) > 1
            for gone in itertools.combinations(range(n), r)
        )
        rate = Fraction(split, math.comb(n, r))
        assert rate <= disconnection(n, k, r), (r, rate)
        if r < k:
            assert split == 0
        assert math.exp(_log_disconnection(n, k, r)) == pytest.approx(
            float(disconnection(n, k, r)), rel=1e-9, abs=0
        )


def test_more_collusion_or_dropout_never_lowers_the_degree() -> None:
    grid = [i / 20 for i in range(9)]
    for n in (10, 25, 60, 200, 1000):
        degree = {(g, d): choose(n, collusion=g, dropout=d).degree for g in grid for d in grid}
        for (g, d), k in degree.items():
            assert all(degree[(g2, d)] >= k for g2 in grid if g2 > g), (n, g, d)
            assert all(degree[(g, d2)] >= k for d2 in grid if d2 > d), (n, g, d)


def test_complete_graph_when_nothing_sparse_fits() -> None:
    p = choose(20, collusion=0.5, dropout=0.4)  # 10 colluders, 8 dropouts: 10 < t <= 12
    assert p.complete and p.degree == 19 and 10 < p.threshold <= 12
    assert p.log2_security_failure == -math.inf and p.log2_correctness_failure == -math.inf


def test_inputs_are_validated() -> None:
    for n in (2, 0, True, 3.0):
        with pytest.raises(SecAggError, match="n >= 3"):
            choose(n, collusion=0.1, dropout=0.1)  # type: ignore[arg-type]
    for gamma in (1.0, -0.1, math.nan):
        with pytest.raises(SecAggError, match="collusion"):
            choose(100, collusion=gamma, dropout=0.1)
    for delta in (1.0, -0.1, math.nan):
        with pytest.raises(SecAggError, match="dropout"):
            choose(100, collusion=0.1, dropout=delta)
    for bits in (39, 39.9, math.inf, math.nan):
        with pytest.raises(SecAggError, match="security_bits"):
            choose(100, collusion=0.1, dropout=0.1, security_bits=bits)
    with pytest.raises(SecAggError, match="correctness_bits"):
        choose(100, collusion=0.1, dropout=0.1, correctness_bits=0)


@pytest.mark.parametrize("n,gamma,delta", [(10, 0.5, 0.5), (100, 0.6, 0.4), (50, 0.0, 0.6)])
def test_impossible_inputs_raise_naming_them(n: int, gamma: float, delta: float) -> None:
    with pytest.raises(SecAggError) as info:
        choose(n, collusion=gamma, dropout=delta)
    message = str(info.value)
    for part in (f"n={n}", f"collusion={gamma}", f"dropout={delta}", "complete graph"):
        assert part in message


def test_todays_default_exposure_at_1000_nodes() -> None:
    """k = 20, t = 11 at n = 1000 with a third colluding: each honest node is exposed with
    probability ~3.6 %, so ~24 of the 667 honest nodes are expected to be; the union bound
    that *some* node is exposed is therefore 1 (capped)."""
    per_node = node_exposure_probability(1000, 20, 11, 1 / 3)
    assert 0.035 < per_node < 0.037
    assert 23 < 667 * per_node < 25
    assert exposure_probability(1000, 20, 11, 1 / 3) == 1.0
    assert choose(1000, collusion=1 / 3, dropout=0.05).degree > 20


def test_to_dict_is_json() -> None:
    p = choose(1000, collusion=0.1, dropout=0.05)
    d = p.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["degree"] == p.degree and d["threshold"] == p.threshold and d["n"] == 1000
    q = choose(10, collusion=0.0, dropout=0.0).to_dict()
    assert q["log2_security_failure"] is None and q["log2_correctness_failure"] is None
    assert isinstance(p, SecAggParameters)
    with pytest.raises(AttributeError):
        p.degree = 2  # type: ignore[misc]
