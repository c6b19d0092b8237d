"""Bounds the audit rows of refused calls, so a flood cannot grow the database without limit.

Refused calls (status >= 400) are grouped by key: who (the subject, or the client address when
there is none), status, reason and endpoint. In each window of ``window`` seconds, the first
``per_key`` calls of a key, and at most ``total`` calls in all, are written one by one; the rest
are only counted, and each key's count becomes one aggregate row (``count`` = the calls it
stands for) when the window closes or the log is flushed. Keys beyond ``max_keys`` in a window
share one overflow key, so the bookkeeping is bounded too.

At most ``total + max_keys + 1`` rows of refusals a window, whatever arrives.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from fedaiot.serving.audit_record import AuditRecord, make_record

_OVERFLOW = ("*", 0, "overflow", "*", "*")
Key = tuple[str, int, str, str, str]


@dataclass(slots=True)
class _Tally:
    written: int = 0
    suppressed: int = 0
    sample: AuditRecord | None = field(default=None)


class RefusalSampler:
    def __init__(
        self, window: float, per_key: int, total: int, max_keys: int, start: float | None = None
    ) -> None:
        self.window, self.per_key, self.total, self.max_keys = window, per_key, total, max_keys
        self._lock = threading.Lock()
        self._start = time.monotonic() if start is None else start
        self._written = 0
        self._tallies: dict[Key, _Tally] = {}

    @staticmethod
    def key(record: AuditRecord) -> Key:
        who = record.subject or record.client or ""
        return (who, record.status, record.reason or "", record.method, record.endpoint)

    def admit(self, record: AuditRecord, now: float | None = None) -> list[AuditRecord]:
        """The rows to write for ``record``: itself, nothing (counted), and, when a window has
        just closed, the previous window's aggregate rows."""
        if record.status < 400:
            return [record]
        now = time.monotonic() if now is None else now
        with self._lock:
            out = self._roll(now)
            key = self.key(record)
            tally = self._tallies.get(key)
            if tally is None:
                if len(self._tallies) >= self.max_keys:
                    key = _OVERFLOW
                tally = self._tallies.setdefault(key, _Tally())
            if tally.written < self.per_key and self._written < self.total and key != _OVERFLOW:
                tally.written += 1
                self._written += 1
                out.append(record)
            else:
                tally.suppressed += 1
                tally.sample = record
        return out

    def drain(self, now: float | None = None, force: bool = False) -> list[AuditRecord]:
        """Aggregate rows due: those of a closed window, or with ``force`` everything counted
        so far (the window itself goes on: its one-by-one allowance is not renewed)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            out = self._roll(now)
            if force:
                out += self._aggregates()
        return out

    def _roll(self, now: float) -> list[AuditRecord]:
        if now - self._start < self.window:
            return []
        out = self._aggregates()
        self._start, self._written, self._tallies = now, 0, {}
        return out

    def _aggregates(self) -> list[AuditRecord]:
        out = []
        for key, tally in self._tallies.items():
            if tally.suppressed and tally.sample is not None:
                out.append(_aggregate(key, tally.sample, tally.suppressed, self.window))
                tally.suppressed, tally.sample = 0, None
        return out


def _aggregate(key: Key, sample: AuditRecord, count: int, window: float) -> AuditRecord:
    note = f"{count} refused calls like this one in this {window:g} s window, not logged one by one"
    if key == _OVERFLOW:
        note = f"{count} refused calls of other callers in this {window:g} s window (too many)"
        sample = replace(sample, subject=None, role=None, client=None, jti=None, method="*")
        sample = replace(sample, endpoint="*", reason="overflow")
    row = make_record(
        request_id="aggregate",
        method=sample.method,
        endpoint=sample.endpoint,
        status=sample.status,
        duration_ms=0.0,
        subject=sample.subject,
        role=sample.role,
        client=sample.client,
        reason=sample.reason,
        model_version=sample.model_version,
        note=note,
    )
    return replace(row, count=count)
