"""What each alert rule reads now: one ``Reading`` per subject (the served version, or a node).

Model rules read the served version only: its manifest against the previously served one's
(``accuracy_drop``), its drift over the window (``drift``), its predict calls' outcomes
(``error_rate``). Coordinator rules read the run's journal (``node_missing``, ``budget``). A rule
that cannot be read now (no journal yet, no budget known) gives no reading and a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedaiot.monitoring.journal import epsilons, missing_nodes, rounds, run_budget
from fedaiot.monitoring.rules import AccuracyDrop, Budget, Drift, ErrorRate, NodeMissing
from fedaiot.registry.store import RegistryError
from fedaiot.serving.holder import ModelHolder
from fedaiot.serving.monitor import Monitor


@dataclass(frozen=True, slots=True)
class Reading:
    subject: str
    holds: bool
    message: str
    value: float | None = None
    threshold: float | None = None


class Unreadable(Exception):
    """The rule cannot be evaluated now; the message says why (shown with the rule)."""


def previous_version(holder: ModelHolder) -> str | None:
    """The version served before the current one (served.json), if any."""
    current = holder.current.version
    for version in reversed(holder.history()):
        if version != current:
            return version
    return None


def accuracy_drop(rule: AccuracyDrop, holder: ModelHolder, key: Ed25519PublicKey) -> Reading:
    served = holder.current
    previous = previous_version(holder)
    if previous is None:
        return Reading(served.version, False, "no version was served before this one")
    try:
        before = holder.registry.verify(previous, key).metrics.get(rule.metric)
    except RegistryError as exc:
        raise Unreadable(f"the previously served {previous} cannot be verified: {exc}") from None
    now = served.manifest.metrics.get(rule.metric)
    if now is None or before is None or not (math.isfinite(now) and math.isfinite(before)):
        raise Unreadable(f"{served.version} or {previous} has no {rule.metric}")
    drop = before - now
    message = (
        f"{rule.metric} of {served.version} is {now:.4f}, {drop:+.4f} below {previous}'s "
        f"{before:.4f} (allowed: {rule.max_drop})"
    )
    return Reading(served.version, drop > rule.max_drop, message, drop, rule.max_drop)


def drift(rule: Drift, holder: ModelHolder, monitor: Monitor) -> Reading:
    served = holder.current
    stats = monitor.track(served)
    if stats.features is None:
        raise Unreadable(f"{served.version} has no normalization statistics to measure drift on")
    found = monitor.drift(stats, rule.window_seconds)
    if found is None or found[1] < rule.min_rows:
        rows = found[1] if found else 0
        return Reading(served.version, False, f"{rows} of {rule.min_rows} rows in the window")
    values, rows = found
    worst = int(values.argmax())
    message = (
        f"input drift on {served.version}: PSI of {stats.features[worst]!r} is "
        f"{values[worst]:.3f} over the last {rule.window_seconds:g} s ({rows} rows; "
        f"threshold {rule.threshold})"
    )
    return Reading(
        served.version, bool(values[worst] > rule.threshold), message, float(values[worst]),
        rule.threshold,
    )  # fmt: skip


def error_rate(rule: ErrorRate, holder: ModelHolder, monitor: Monitor) -> Reading:
    served = holder.current
    monitor.track(served)
    snap = monitor.snapshot(served.version, rule.window_seconds)
    assert snap is not None
    bad = snap.errors + (snap.refused if rule.include_refusals else 0)
    what = "failed or refused" if rule.include_refusals else "failed"
    if snap.requests < rule.min_requests:
        message = f"{snap.requests} of {rule.min_requests} predict calls in the window"
        return Reading(served.version, False, message)
    rate = bad / snap.requests
    message = (
        f"{bad} of {snap.requests} predict calls {what} on {served.version} over the last "
        f"{rule.window_seconds:g} s ({rate:.1%}; threshold {rule.threshold:.1%})"
    )
    return Reading(served.version, rate > rule.threshold, message, rate, rule.threshold)


def node_missing(rule: NodeMissing, firing: list[str]) -> list[Reading]:
    if not rule.journal.exists():
        raise Unreadable(f"no journal at {rule.journal} yet")
    events = rounds(rule.journal)
    missing = {m.node: m for m in missing_nodes(events, rule.rounds)}
    readings = []
    for node in sorted(set(missing) | set(firing)):
        found = missing.get(node)
        if found is None:
            readings.append(Reading(node, False, f"node {node} replies again"))
            continue
        since = f"since round {found.last_counted}" if found.last_counted else "ever"
        message = f"node {node} has had no counted reply for {found.rounds} rounds ({since})"
        readings.append(Reading(node, True, message, float(found.rounds), float(rule.rounds)))
    return readings


def budget(rule: Budget, firing: list[str]) -> list[Reading]:
    if not rule.journal.exists():
        raise Unreadable(f"no journal at {rule.journal} yet")
    total = rule.epsilon if rule.epsilon is not None else run_budget(rule.journal)
    if total is None:
        raise Unreadable("the run's epsilon budget is not known yet: set epsilon in the rule")
    spent = epsilons(rounds(rule.journal))
    readings = []
    for node in sorted(set(spent) | set(firing)):
        used = spent.get(node, 0.0) / total
        message = (
            f"node {node} has spent epsilon {spent.get(node, 0.0):.3f} of its {total:g} "
            f"({used:.0%}; threshold {rule.fraction:.0%})"
        )
        readings.append(Reading(node, used >= rule.fraction, message, used, rule.fraction))
    return readings
