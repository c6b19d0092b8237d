"""Distributed DP: every node adds a share of integer noise inside secure aggregation.

The mechanism. A distributed round is one DP-SGD step on the union of the nodes' records.
Every node Poisson-samples its records at the coordinator's rate ``q``, clips each record's
gradient to ``max-grad-norm`` (C), sums the clipped gradients, scales the sum by ``scale / C``
into integer units, rounds each coordinate at random (``floor(x + U)``, unbiased) and adds
symmetric Skellam noise of variance ``(sigma * l2)^2 / honest`` per coordinate
(:func:`fedaiot.privacy.skellam.sample_skellam`). Secure aggregation sums the integer vectors
exactly (in Z_2^64), so the coordinator learns the sum and nothing else; it divides by the
expected batch ``q x`` (the sum of the nodes' noisy counts) and takes one optimizer step.

The guarantee, and the trust it needs. Adding or removing one record changes a node's integer
vector by at most ``l2 = scale + sqrt(d)`` in L2 norm (the record's clipped gradient, ``scale``
in integer units, plus at most 1 per coordinate from coupling the random roundings) and by at
most ``l1 = min(sqrt(d) scale + d, l2^2)`` in L1 norm. Sums of independent symmetric Skellams
are symmetric Skellam, so the noise in the unmasked sum is exactly Skellam with the summed
variance. Secure aggregation unmasks only a sum of at least ``t`` nodes (its threshold); if at
most ``c`` of them collude with the coordinator (``dp-collusion``), at least ``t - c`` honest
shares remain, whose noise alone has variance ``(sigma * l2)^2``: the target. Every round is
then the Poisson-subsampled Skellam mechanism with noise multiplier ``sigma``, accounted with
the Skellam RDP bound (:mod:`fedaiot.privacy.rdp`). This is the *distributed* epsilon. What a
node's own share alone guarantees (if every other node colluded) is the *local* epsilon, the
same mechanism with ``sigma / sqrt(t - c)``; both are in the ledger.

What the caller must do: use the same ``sigma`` on every node of a run (:func:`plan_sigma`
depends only on the run's terms), refuse when ``t - c < 1``, draw the rounding and the noise
from a fresh :class:`~fedaiot.privacy.randomness.SecureRandom`, and send the vector only
inside secure aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedaiot.config.run import RunConfig
from fedaiot.privacy.accounting import HistoryEntry
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.privacy.rdp import SkellamEntry, plan_skellam_noise
from fedaiot.privacy.skellam import sample_skellam

# The rounding adds at most sqrt(d) to a record's L2 sensitivity; a scale of 100 sqrt(d)
# keeps that below 1 % (a power of two, so the scaling itself is exact in float64).
ROUNDING_SHARE = 100.0
# A node's integers stay exact in float64 and a sum of up to 2^10 of them cannot wrap Z_2^64.
MAX_MAGNITUDE = 2.0**52
ACCOUNTANT = "skellam-rdp"


class ShareError(ValueError):
    """A node's share cannot be encoded (it would not be exact, or could wrap the ring)."""


@dataclass(frozen=True)
class ShareGeometry:
    """The integer units of one model's gradient sums: the same on every node and at the
    coordinator, fixed by the parameter count and the clipping norm."""

    dimension: int
    clip: float
    scale: float  # a clipped record's gradient has L2 norm <= scale in integer units

    @classmethod
    def of(cls, dimension: int, clip: float) -> ShareGeometry:
        if dimension < 1 or not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"need dimension >= 1 and clip > 0, got {dimension}, {clip}")
        scale = 2.0 ** math.ceil(math.log2(ROUNDING_SHARE * math.sqrt(dimension)))
        return cls(dimension, clip, scale)

    @property
    def l2(self) -> float:
        return self.scale + math.sqrt(self.dimension)

    @property
    def l1(self) -> float:
        return min(math.sqrt(self.dimension) * self.scale + self.dimension, self.l2**2)

    def entry(self, sigma: float, sample_rate: float, steps: int) -> SkellamEntry:
        """An accountant history entry of ``steps`` rounds at noise multiplier ``sigma``."""
        return (sigma, sample_rate, steps, self.l2, self.l1)

    def share_variance(self, sigma: float, honest: int) -> float:
        """Each node's noise variance per coordinate: any ``honest`` shares reach the target."""
        if honest < 1:
            raise ValueError(f"at least one honest share is needed, got {honest}")
        return (sigma * self.l2) ** 2 / honest


def honest_shares(threshold: int, collusion: int) -> int:
    """How many noise shares the unmasked sum is sure to hold from honest nodes."""
    return threshold - collusion


def plan_sigma(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    geometry: ShareGeometry,
    before: Sequence[HistoryEntry],
) -> float:
    """The run's noise multiplier: ``rounds`` one-step rounds after the Gaussian releases
    every node makes ``before`` training, within ``epsilon``. Only the run's terms enter, so
    every node plans the same."""
    return plan_skellam_noise(
        target_epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=rounds,
        l2=geometry.l2,
        l1=geometry.l1,
        spent_gaussian=before,
    )


def releases_before_training(cfg: RunConfig) -> tuple[HistoryEntry, ...]:
    """What every node of a run releases before its first round: its noisy count (once per
    data set) and, in a study, its contribution to the feature statistics."""
    study = ((cfg.statistics_noise, 1.0, 1),) if cfg.study and cfg.private else ()
    return ((cfg.count_noise, 1.0, 1), *study)


def encode_share(
    clipped_sum: npt.NDArray[np.float64],
    geometry: ShareGeometry,
    variance: float,
    randomness: SecureRandom,
) -> npt.NDArray[np.float64]:
    """The node's integer vector (as exact float64): its clipped gradient sum in integer
    units, rounded at random, plus its Skellam noise share."""
    if clipped_sum.shape != (geometry.dimension,):
        raise ShareError(f"a sum of {clipped_sum.size} values for {geometry.dimension} parameters")
    scaled = clipped_sum.astype(np.float64) * (geometry.scale / geometry.clip)
    rounded = np.floor(scaled + randomness.uniform(geometry.dimension))
    share = rounded + sample_skellam(randomness, geometry.dimension, variance).astype(np.float64)
    if not np.isfinite(share).all() or np.abs(share).max(initial=0.0) >= MAX_MAGNITUDE:
        raise ShareError("the noisy share is too large to be summed exactly")
    return share


def decode_sum(
    total: npt.NDArray[np.float64], geometry: ShareGeometry, sample_rate: float
) -> tuple[npt.NDArray[np.float64], float]:
    """The noisy gradient (the step's average over the expected batch) and the summed noisy
    count, from the unmasked sum of ``[share, noisy count]`` vectors."""
    count = float(total[-1])
    expected_batch = sample_rate * max(count, 1.0)
    gradient = total[:-1] * (geometry.clip / geometry.scale) / expected_batch
    return gradient, count


def plausible_norm(
    geometry: ShareGeometry, *, count: float, count_noise: float, nodes: int, variance: float
) -> float:
    """The largest L2 norm honest nodes' summed shares can have (integer units), with room:
    every record's clipped gradient, plus the noise (its norm concentrates at sqrt(d n var))."""
    records = max(count, 0.0) + 8 * count_noise * math.sqrt(nodes)
    noise = math.sqrt(geometry.dimension * nodes * variance)
    return records * geometry.l2 + 1.5 * noise + 10 * math.sqrt(nodes * variance)
