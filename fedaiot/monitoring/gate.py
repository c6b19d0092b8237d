"""The promotion gate: promote a candidate only if its accuracy is not worse than the served
model's by more than a margin, with confidence, and it agreed with the served model on enough
live traffic.

Accuracy is compared from counts (correct of evaluated, from the two versions' manifests) with
Newcombe's hybrid score interval for a difference of two proportions, built from the Wilson
intervals of each (Newcombe, Statistics in Medicine 1998, method 10). It treats the two
evaluations as independent; on the same test set they are paired, so the interval is wider
than it needs to be: conservative. Agreement is the share of shadowed rows on which the
candidate gave the served model's label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal


@dataclass(frozen=True, slots=True)
class Counts:
    successes: int
    total: int

    @property
    def rate(self) -> float:
        return self.successes / self.total if self.total else math.nan

    @classmethod
    def of(cls, rate: float, total: int) -> Counts:
        """Counts from a reported rate (an accuracy) over ``total`` records."""
        if not (0.0 <= rate <= 1.0) or total < 0:
            raise ValueError(f"a rate in [0, 1] over a count >= 0, got {rate} over {total}")
        return cls(round(rate * total), total)


def _z(confidence: float) -> float:
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson(counts: Counts, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    n = counts.total
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = counts.successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(a: Counts, b: Counts, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's interval for ``rate(a) - rate(b)``."""
    (l1, u1), (l2, u2) = wilson(a, confidence), wilson(b, confidence)
    p1, p2 = a.rate, b.rate
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


@dataclass(frozen=True, slots=True)
class GatePolicy:
    margin: float = 0.0  # the lower bound of (candidate - served) must reach this
    confidence: float = 0.95
    min_agreement: float = 0.9
    min_shadow_rows: int = 500


@dataclass(frozen=True, slots=True)
class GateDecision:
    outcome: Literal["promote", "refuse", "wait"]
    reasons: list[str] = field(default_factory=list)
    difference: float = math.nan  # candidate - served accuracy
    interval: tuple[float, float] = (math.nan, math.nan)
    agreement: float = math.nan
    shadow_rows: int = 0

    def summary(self) -> str:
        return f"{self.outcome}: " + "; ".join(self.reasons)


def promotion_gate(
    candidate: Counts, served: Counts, agreement: Counts, policy: GatePolicy
) -> GateDecision:
    """Promote, refuse, or wait for more shadow traffic."""
    if candidate.total == 0 or served.total == 0:
        return GateDecision("refuse", ["no evaluation counts for the candidate or the served"])
    low, high = difference_interval(candidate, served, policy.confidence)
    difference = candidate.rate - served.rate
    level = f"{policy.confidence:.0%}"
    accuracy = (
        f"accuracy {candidate.rate:.4f} against {served.rate:.4f} (difference {difference:+.4f}, "
        f"{level} interval [{low:+.4f}, {high:+.4f}], margin {policy.margin:+.4f})"
    )
    rate = agreement.rate

    def decide(outcome: Literal["promote", "refuse", "wait"], *why: str) -> GateDecision:
        return GateDecision(outcome, list(why), difference, (low, high), rate, agreement.total)

    if low < policy.margin:
        return decide("refuse", f"{accuracy}: the lower bound is below the margin")
    if agreement.total < policy.min_shadow_rows:
        return decide(
            "wait", accuracy, f"{agreement.total} of {policy.min_shadow_rows} shadow rows so far"
        )
    agreed = f"agreement {rate:.3f} on {agreement.total} rows (minimum {policy.min_agreement})"
    if rate < policy.min_agreement:
        return decide("refuse", accuracy, agreed)
    return decide("promote", accuracy, agreed)
