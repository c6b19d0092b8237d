"""What a node answers a round with, and what of it may cross the wire in the clear.

Flower-free and torch-free: the node builds a :class:`NodeReply`, the coordinator reads one,
and neither side needs the other's stack. Everything a reply puts in the clear is listed here
(and, with what it reveals, in ``docs/privacy.md``):

* ``status``: trained, refused or failed;
* ``reason``: one code of :data:`REASONS`, never free text (a node's error may quote its data
  or its paths, so the detail stays in the node's own log);
* ``metrics``: only the names in :data:`CLEAR_METRICS` for its mode;
* the node's identity: in simulation its partition (``node-3``); a deployed node sends none
  and the coordinator names it from the key the SuperLink authenticated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch


class Releasable(Protocol):
    """A charged round whose update has not left the node yet (``privacy.budget``)."""

    def to_record(self) -> dict[str, str | int | list[str]]: ...

    def release(self) -> None: ...


TRAINED, REFUSED, FAILED = "trained", "refused", "failed"
CONTRIBUTED = "contributed"  # a vector computed for a release (statistics, evaluation)

REASONS: dict[str, str] = {
    "budget-exhausted": "the round would take the node's data over its privacy budget",
    "duplicate-identity": "another node answered under the same identity",
    "data-error": "the node's data could not be read or does not fit the task",
    "config-error": "the node's own configuration does not fit the run",
    "seeded-noise-refused": "a deployed node never trains with noise from a known seed",
    "ledger-error": "the node's privacy ledger is unreadable or belongs to other data",
    "protocol-error": "a secure-aggregation message was refused by the node",
    "dropped-out": "the node dropped out of the round (simulated)",
    "missed-deadline": "the node's reply came after the round's deadline (simulated)",
    "internal-error": "the node failed; the detail is in the node's own log",
}

# The metrics a reply may carry in the clear, by mode. Under DP a node sends its accounting
# and, without secure aggregation, its noisy count (its weight); never its training loss, its
# exact size or how long it trained. Under secure aggregation even the weight travels masked.
CLEAR_METRICS: dict[str, tuple[str, ...]] = {
    "private": ("num-examples", "epsilon", "delta", "noise-multiplier"),
    # a distributed-DP round adds the epsilon of the node's own noise share alone
    "private-secure": ("epsilon", "epsilon-local", "delta", "noise-multiplier"),
    "non-private": ("num-examples", "train-loss", "epsilon", "delta", "noise-multiplier"),
    "non-private-secure": ("epsilon", "delta", "noise-multiplier"),
    "refused": ("epsilon", "delta"),
    # a release's vector travels (DP-noised) in the clear only without secure aggregation
    CONTRIBUTED: ("epsilon", "delta"),
    "failed": (),
}


def clear_metrics(mode: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` cut down to what ``mode`` may send in the clear."""
    allowed = CLEAR_METRICS[mode]
    return {name: value for name, value in metrics.items() if name in allowed}


@dataclass(frozen=True)
class NodeReply:
    """A node's answer. ``weight`` is its weight in the average (the noisy count under DP,
    the exact count without); it leaves the node in the clear only without secure
    aggregation. ``detail`` is for the node's own log and never leaves it."""

    status: str
    node: str
    weight: float
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None = None
    reason: str = ""
    detail: str = ""
    pending: Releasable | None = None  # a charge to mark released when the update leaves
    vector: np.ndarray | None = None  # a release's vector (statistics, evaluation counts)

    def __post_init__(self) -> None:
        if self.reason and self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}")


def failure(node: str, reason: str, detail: str = "") -> NodeReply:
    return NodeReply(FAILED, node, 0.0, {}, reason=reason, detail=detail)


def describe(reply: NodeReply) -> str:
    """One line for the node's own console and log (it may say more than the wire does)."""
    m = reply.metrics
    if reply.status != TRAINED:
        return f"{reply.status} ({reply.reason}){': ' + reply.detail if reply.detail else ''}"
    parts = [f"trained: epsilon {m.get('epsilon', float('nan')):.3f}"]
    if "train-loss" in m:
        parts.append(f"loss {m['train-loss']:.4f}")
    if "examples" in m:
        parts.append(f"{int(m['examples'])} records")
    if "train-seconds" in m:
        parts.append(f"{m['train-seconds']:.1f} s")
    return ", ".join(parts)
