"""The alert engine: evaluates the rules file every ``interval_seconds``, turns readings into
firing and resolved events, sends each event everywhere it goes, and acts.

Every event goes to the audit log (endpoint ``(alert)``), to ``GET /v1/alerts``, to the webhook
(a JSON POST) and to Prometheus (``fedaiot_alerts_total``, ``fedaiot_alert_firing``). A model
rule marked ``rollback: true`` that fires on the served version rolls it back (the same
verified ``ModelHolder.rollback`` an admin calls), audited as ``(monitor)`` with the rule's
message. The ``promotion_gate`` rule decides on shadowed candidates: promote (audited with the
gate's reasons) or refuse; either way the candidate's shadow stops and keeps the decision.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel

from fedaiot.monitoring.events import AlertEvent, Tracker
from fedaiot.monitoring.gate import Counts, GatePolicy, promotion_gate
from fedaiot.monitoring.rules import (
    MODEL_RULES,
    AccuracyDrop,
    Budget,
    Drift,
    ErrorRate,
    NodeMissing,
    PromotionGate,
    Rule,
    RulesFile,
)
from fedaiot.monitoring.webhook import WebhookSender
from fedaiot.registry.store import Manifest, RegistryError
from fedaiot.serving import alert_checks as checks
from fedaiot.serving import reasons
from fedaiot.serving.audit import AuditLog, make_record
from fedaiot.serving.holder import ModelHolder
from fedaiot.serving.metrics import ServiceMetrics
from fedaiot.serving.models import ModelLoadError
from fedaiot.serving.monitor import Monitor
from fedaiot.serving.shadow import Shadow

log = logging.getLogger(__name__)
MONITOR = "monitor"  # the audit log's subject for what the engine does


class RuleStatus(BaseModel):
    name: str
    kind: str
    severity: str
    rollback: bool
    firing: list[str]
    note: str | None = None


class AlertFeed(BaseModel):
    rules: list[RuleStatus]
    firing: list[AlertEvent]
    events: list[AlertEvent]


class AlertEngine:
    def __init__(
        self,
        rules: RulesFile,
        holder: ModelHolder,
        monitor: Monitor,
        shadow: Shadow,
        audit: AuditLog,
        metrics: ServiceMetrics,
        key: Ed25519PublicKey,
        registry: CollectorRegistry,
    ) -> None:
        self.rules = rules
        self.holder, self.monitor, self.shadow = holder, monitor, shadow
        self.audit, self.metrics, self.key = audit, metrics, key
        self.tracker = Tracker()
        self.notes: dict[str, str] = {}  # rule -> why it could not be evaluated last time
        self._firing: dict[tuple[str, str], AlertEvent] = {}
        hook = rules.webhook
        self.webhook = (
            WebhookSender(str(hook.url), hook.timeout_seconds, hook.headers) if hook else None
        )
        self._alerts = Counter(
            "fedaiot_alerts",
            "Alert events, by rule, kind, severity and state",
            ["rule", "kind", "severity", "state"],
            registry=registry,
        )
        self._gauge = Gauge(
            "fedaiot_alert_firing",
            "1 while a rule fires for a subject (a version or a node)",
            ["rule", "kind", "subject"],
            registry=registry,
        )
        self._actions = Counter(
            "fedaiot_monitor_actions",
            "Rollbacks and gate decisions taken by the alert engine",
            ["action", "outcome"],
            registry=registry,
        )
        failures = Gauge(
            "fedaiot_alert_webhook_failures",
            "Alert events the webhook did not take",
            registry=registry,
        )
        failures.set_function(lambda: float(self.webhook.failures if self.webhook else 0))

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Evaluate every ``interval_seconds`` until cancelled (the app's lifespan)."""
        while True:
            await asyncio.sleep(self.rules.interval_seconds)
            try:
                await run_in_threadpool(self.evaluate)
            except Exception:  # an evaluation bug must not stop monitoring
                log.exception("alert rules: evaluation failed")

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()

    def evaluate(self, now: float | None = None) -> list[AlertEvent]:
        """Read every rule once; the events this produced."""
        now = time.monotonic() if now is None else now
        events: list[AlertEvent] = []
        for rule in self.rules.rules:
            try:
                if isinstance(rule, PromotionGate):
                    events += self._gate(rule)
                else:
                    for reading in self._read(rule):
                        events += self._apply(rule, reading, now)
                self.notes.pop(rule.name, None)
            except checks.Unreadable as exc:
                self.notes[rule.name] = str(exc)
        return events

    def _read(self, rule: Rule) -> list[checks.Reading]:
        firing = self.tracker.firing(rule.name)
        if isinstance(rule, NodeMissing):
            return checks.node_missing(rule, firing)
        if isinstance(rule, Budget):
            return checks.budget(rule, firing)
        if isinstance(rule, AccuracyDrop):
            reading = checks.accuracy_drop(rule, self.holder, self.key)
        elif isinstance(rule, Drift):
            reading = checks.drift(rule, self.holder, self.monitor)
        elif isinstance(rule, ErrorRate):
            reading = checks.error_rate(rule, self.holder, self.monitor)
        else:
            raise TypeError(f"no check for {rule.kind}")
        # A version no longer served (rolled back, promoted over) resolves.
        gone = [
            checks.Reading(v, False, f"{v} is no longer served")
            for v in firing
            if v != reading.subject
        ]
        return [*gone, reading]

    # --- firing, resolving, acting ---------------------------------------------------------------

    def _apply(self, rule: Rule, reading: checks.Reading, now: float) -> list[AlertEvent]:
        for_seconds = getattr(rule, "for_seconds", 0.0)
        change = self.tracker.update(rule.name, reading.subject, reading.holds, for_seconds, now)
        if change is None:
            return []
        key = (rule.name, reading.subject)
        action = None
        if change == "fire" and rule.kind in MODEL_RULES and getattr(rule, "rollback", False):
            action = self._rollback(rule, reading)
        event = self._emit(
            rule,
            "firing" if change == "fire" else "resolved",
            reading.subject,
            reading.message,
            value=reading.value,
            threshold=reading.threshold,
            action=action,
        )
        if change == "fire":
            self._firing[key] = event
            self._gauge.labels(rule.name, rule.kind, reading.subject).set(1)
        else:
            self._firing.pop(key, None)
            self._gauge.remove(rule.name, rule.kind, reading.subject)
        return [event]

    def _emit(
        self, rule: Rule, state: str, subject: str | None, message: str, **more: Any
    ) -> AlertEvent:
        event = self.tracker.event(
            rule=rule.name,
            kind=rule.kind,
            severity=rule.severity,
            state=state,
            subject=subject,
            message=message,
            **more,
        )
        self._alerts.labels(rule.name, rule.kind, rule.severity, state).inc()
        note = f"{state} {rule.name}: {message}" + (f" => {event.action}" if event.action else "")
        self._audit("(alert)", f"alert_{state}", note, subject)
        if self.webhook is not None:
            self.webhook.send({"source": "fedaiot", **event.model_dump()})
        log.warning("alert %s", note)
        return event

    def _audit(
        self, endpoint: str, reason: str, note: str, version: str | None, status: int = 200
    ) -> None:
        self.audit.record(
            make_record(
                request_id=uuid.uuid4().hex,
                method="-",
                endpoint=endpoint,
                status=status,
                duration_ms=0.0,
                subject=MONITOR,
                model_version=version,
                reason=reason,
                note=note[:2000],
            )
        )

    def _rollback(self, rule: Rule, reading: checks.Reading) -> str:
        if reading.subject != self.holder.current.version:
            return "no rollback: the version is no longer served"
        try:
            previous, now = self.holder.rollback()
        except LookupError as exc:
            outcome, action, status = "refused", f"no rollback: {exc}", 409
        except ModelLoadError as exc:
            outcome, action, status = "refused", f"rollback refused: {exc}", 409
        except (RegistryError, OSError) as exc:
            outcome, action, status = "failed", f"rollback failed: {exc}", 503
        else:
            self.metrics.swap("rollback", "done")
            self.metrics.served(now)
            outcome, action, status = "done", f"rollback: {previous} -> {now}", 200
        self._actions.labels("rollback", outcome).inc()
        if outcome != "done":
            self.metrics.swap("rollback", outcome)
        note = f"{action} (alert {rule.name}: {reading.message})"
        self._audit("(monitor)", reasons.ALERT_ROLLBACK, note, self.holder.current.version, status)
        return action

    # --- the promotion gate ----------------------------------------------------------------------

    def _counts(self, rule: PromotionGate, manifest: Manifest) -> Counts:
        rate = manifest.metrics.get(rule.metric)
        found = manifest.metrics.get(rule.examples_metric)
        total = int(found) if found is not None else rule.examples
        if rate is None or total is None:
            raise checks.Unreadable(
                f"{manifest.version} has no {rule.metric} or no {rule.examples_metric}: "
                "set examples in the rule"
            )
        return Counts.of(rate, total)

    def _gate(self, rule: PromotionGate) -> list[AlertEvent]:
        events = []
        policy = GatePolicy(rule.margin, rule.confidence, rule.min_agreement, rule.min_shadow_rows)
        for candidate in self.shadow.active():
            served = self.holder.current
            try:
                manifest = self.holder.registry.verify(candidate, self.key)
            except RegistryError as exc:
                raise checks.Unreadable(f"candidate {candidate}: {exc}") from None
            decision = promotion_gate(
                self._counts(rule, manifest),
                self._counts(rule, served.manifest),
                self.shadow.agreement(candidate, served.version),
                policy,
            )
            if decision.outcome == "wait":
                continue
            action = f"refused {candidate}"
            if decision.outcome == "promote":
                action = self._promote(rule, candidate, decision.summary())
            record = {
                "rule": rule.name,
                "outcome": decision.outcome,
                "action": action,
                "reasons": decision.reasons,
                "time": time.time(),
            }
            self.shadow.decide(candidate, record)
            self._actions.labels("gate", decision.outcome).inc()
            reason = reasons.GATE_PROMOTE if decision.outcome == "promote" else reasons.GATE_REFUSE
            note = f"gate {rule.name}: {action}: " + "; ".join(decision.reasons)
            self._audit("(monitor)", reason, note, candidate)
            events.append(
                self._emit(
                    rule,
                    "decision",
                    candidate,
                    decision.summary(),
                    action=action,
                    value=decision.interval[0],
                    threshold=rule.margin,
                )
            )
        return events

    def _promote(self, rule: PromotionGate, candidate: str, why: str) -> str:
        try:
            previous, now = self.holder.promote(candidate)
        except ModelLoadError as exc:
            self.metrics.swap("promote", "refused")
            return f"promotion refused: {exc}"
        except (RegistryError, OSError) as exc:
            self.metrics.swap("promote", "failed")
            return f"promotion failed: {exc}"
        self.metrics.swap("promote", "done")
        self.metrics.served(now)
        return f"promote: {previous} -> {now}"

    # --- reading ---------------------------------------------------------------------------------

    def feed(self, limit: int = 100) -> AlertFeed:
        statuses = [
            RuleStatus(
                name=rule.name,
                kind=rule.kind,
                severity=rule.severity,
                rollback=bool(getattr(rule, "rollback", False)),
                firing=self.tracker.firing(rule.name),
                note=self.notes.get(rule.name),
            )
            for rule in self.rules.rules
        ]
        firing = sorted(self._firing.values(), key=lambda e: e.id, reverse=True)
        return AlertFeed(rules=statuses, firing=firing, events=self.tracker.events(limit))
