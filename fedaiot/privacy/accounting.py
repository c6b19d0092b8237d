"""Privacy accounting for DP-SGD on a node: planning the noise and measuring what was spent.

The guarantee. A node that trains only through :func:`fedaiot.training.train_private` with the
noise multiplier from :func:`plan_noise` gives *record-level* (epsilon, delta)-differential
privacy for its local data set: whatever the coordinator (or anyone who sees every update the
node ever sent) learns, it would have learned with about the same probability had any one
record been absent. The accounting is Rényi DP of the sub-sampled Gaussian mechanism (Mironov
et al. 2019, as in Opacus' ``RDPAccountant``) with Poisson sampling at rate ``q``.

What the caller must do for this to hold:

* keep *one* history per data set across every round and every run (see
  :class:`fedaiot.privacy.ledger.PrivacyLedger`); a fresh accountant per round under-reports;
* plan the noise once for the whole participation, against the history already spent;
* never train on the data outside the planned steps (each extra step costs epsilon);
* pick ``delta`` well below ``1 / n`` for ``n`` records.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

# (noise multiplier, sample rate, steps), exactly Opacus' accountant history format.
HistoryEntry = tuple[float, float, int]


class BudgetExhaustedError(RuntimeError):
    """The next planned training would spend more than the node's privacy budget."""


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at Opacus' orders: the costly part (about 0.2 s for the fractional ones).

    Every node of a run asks for the same few (sigma, q) pairs, and ``plan_noise`` bisects
    through the same sigmas for nodes of equal size, so a cache makes accounting almost free
    after a process's first node instead of seconds for every newly sampled node.
    """
    rdp = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.setflags(write=False)
    return rdp


def epsilon_spent(history: Sequence[HistoryEntry], delta: float) -> float:
    """Epsilon of the composed history at ``delta`` (0 for an empty history).

    Exactly Opacus' ``RDPAccountant.get_epsilon`` (RDP is linear in the steps and adds up over
    the history), with the per-step RDP cached.
    """
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in history)
    epsilon, _ = privacy_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(epsilon)


def plan_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    spent: Sequence[HistoryEntry] = (),
    tolerance: float = 0.005,
    max_noise: float = 20.0,
) -> float:
    """The smallest noise multiplier whose ``steps`` after ``spent`` stay within the budget.

    Bisection over sigma on the composed history: the result never overshoots
    ``target_epsilon``, and lies within ``tolerance`` (relative) of it. A remainder of budget
    so small that it needs more noise than ``max_noise`` counts as exhausted: training under
    such noise would spend the last of the budget on updates that carry nothing.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    already = epsilon_spent(spent, delta)
    if already >= target_epsilon:
        raise BudgetExhaustedError(
            f"budget exhausted: epsilon {already:.3f} already spent of {target_epsilon:.3f}"
        )

    def total(sigma: float) -> float:
        return epsilon_spent([*spent, (sigma, sample_rate, steps)], delta)

    if total(max_noise) > target_epsilon:
        raise BudgetExhaustedError(
            f"budget too small: with epsilon {already:.3f} of {target_epsilon:.3f} spent, the rest "
            f"cannot pay for {steps} steps at sample rate {sample_rate:.3g} below noise "
            f"{max_noise:g} (fewer rounds, larger batches or a larger budget would)"
        )
    low, high = 0.0, 1.0
    while total(high) > target_epsilon:
        low, high = high, high * 2
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if total(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def epsilon_independent(history: Sequence[HistoryEntry], delta: float) -> float:
    """Epsilon recomputed with Google's ``dp_accounting`` library, as a cross-check.

    Same mechanism (Poisson-sampled Gaussian, RDP), different implementation and order grid:
    the two agree to well under 1 % on DP-SGD histories.
    """
    if not history:
        return 0.0
    import dp_accounting

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    value = float(accountant.get_epsilon(delta))
    return value if math.isfinite(value) else math.inf
