"""One audit row: its columns, and the SQLite table that holds them."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from fedaiot.serving.redact import label


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: str
    unix: float
    request_id: str
    subject: str | None  # from a verified token only
    role: str | None
    client: str | None  # the peer's address (or a trusted proxy's X-Forwarded-For)
    jti: str | None  # the token id; for a refused token, the id it claims (unverified)
    method: str
    endpoint: str
    model_version: str | None
    rows: int | None
    status: int
    reason: str | None
    count: int  # calls this row stands for: 1, or more for an aggregate of refusals
    duration_ms: float
    note: str | None


COLUMNS = [f.name for f in fields(AuditRecord)]
_TYPES = {
    "unix": "REAL NOT NULL",
    "duration_ms": "REAL NOT NULL",
    "rows": "INTEGER",
    "status": "INTEGER NOT NULL",
    "count": "INTEGER NOT NULL DEFAULT 1",
    "time": "TEXT NOT NULL",
    "request_id": "TEXT NOT NULL",
    "method": "TEXT NOT NULL",
    "endpoint": "TEXT NOT NULL",
}
COLUMN_TYPES = {name: _TYPES.get(name, "TEXT") for name in COLUMNS}
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    + ", ".join(f'"{name}" {kind}' for name, kind in COLUMN_TYPES.items())
    + ")"
)
INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_subject_unix ON audit (subject, unix)",
    "CREATE INDEX IF NOT EXISTS audit_unix ON audit (unix)",
)
_QUOTED = ", ".join(f'"{name}"' for name in COLUMNS)
INSERT = f"INSERT INTO audit ({_QUOTED}) VALUES ({', '.join('?' * len(COLUMNS))})"


def make_record(
    *,
    request_id: str,
    method: str,
    endpoint: str,
    status: int,
    duration_ms: float,
    subject: str | None = None,
    role: str | None = None,
    client: str | None = None,
    jti: str | None = None,
    model_version: str | None = None,
    rows: int | None = None,
    reason: str | None = None,
    note: str | None = None,
) -> AuditRecord:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    return AuditRecord(
        time=stamp,
        unix=now,
        request_id=request_id,
        subject=subject,
        role=role,
        client=client,
        jti=label(jti, 128) or None,
        method=method,
        endpoint=endpoint,
        model_version=model_version,
        rows=rows,
        status=status,
        reason=reason,
        count=1,
        duration_ms=round(duration_ms, 3),
        note=note,
    )
