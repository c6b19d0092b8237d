"""Alert events, and the state that turns a rule's condition into firing and resolved events.

A condition must hold for the rule's ``for_seconds`` before it fires (as a Prometheus rule's
``for``); it fires once, and resolves once it stops holding. Each (rule, subject) pair has its
own state: a subject is the model version for model rules and the node for coordinator rules.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

State = Literal["firing", "resolved", "decision"]


class AlertEvent(BaseModel):
    id: int
    time: str
    unix: float
    rule: str
    kind: str
    severity: str
    state: State
    subject: str | None = None  # the model version, or the node
    value: float | None = None
    threshold: float | None = None
    message: str
    action: str | None = None  # what the service did: "rollback: a -> b", "promote: ...", ...


@dataclass(slots=True)
class _Condition:
    since: float
    firing: bool = False


class Tracker:
    """Firing state per (rule, subject), and the newest events (bounded)."""

    def __init__(self, keep: int = 1000) -> None:
        self._conditions: dict[tuple[str, str], _Condition] = {}
        self._events: deque[AlertEvent] = deque(maxlen=keep)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def update(
        self, rule: str, subject: str, holds: bool, for_seconds: float, now: float | None = None
    ) -> Literal["fire", "resolve"] | None:
        """What a new reading of the condition changes: fire, resolve, or nothing."""
        now = time.monotonic() if now is None else now
        key = (rule, subject)
        with self._lock:
            state = self._conditions.get(key)
            if not holds:
                self._conditions.pop(key, None)
                return "resolve" if state is not None and state.firing else None
            if state is None:
                state = self._conditions[key] = _Condition(since=now)
            if not state.firing and now - state.since >= for_seconds:
                state.firing = True
                return "fire"
            return None

    def firing(self, rule: str) -> list[str]:
        with self._lock:
            return sorted(s for (r, s), c in self._conditions.items() if r == rule and c.firing)

    def forget(self, rule: str, subject: str) -> None:
        with self._lock:
            self._conditions.pop((rule, subject), None)

    def event(self, **fields: object) -> AlertEvent:
        now = time.time()
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        with self._lock:
            event = AlertEvent.model_validate(
                {"id": next(self._ids), "time": stamp, "unix": now, **fields}
            )
            self._events.append(event)
        return event

    def events(self, limit: int = 100) -> list[AlertEvent]:
        """The newest events, newest first."""
        with self._lock:
            return list(reversed(self._events))[:limit]
