"""Reading the audit log: filters by subject, status, reason, client and time, newest first.

Shared by ``GET /v1/audit`` and ``fedaiot audit`` (which opens the file read-only, and works on
a database written by an older fedaiot, lacking the newer columns).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedaiot.errors import BadInputError
from fedaiot.serving.audit_record import COLUMNS


class AuditQueryError(BadInputError):
    """The audit database cannot be read, or cannot answer this question."""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    subject: str | None = None
    status: int | None = None
    reason: str | None = None
    client: str | None = None
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # unix seconds, exclusive
    limit: int = 100


def open_read_only(path: Path) -> sqlite3.Connection:
    if not Path(path).is_file():
        raise AuditQueryError(f"no audit database at {path}")
    try:
        return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise AuditQueryError(f"cannot open the audit database {path}: {exc}") from None


def select(conn: sqlite3.Connection, where: AuditFilter) -> list[dict[str, Any]]:
    """Rows matching ``where``, newest first; columns an older database lacks are None."""
    try:
        present = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
        if not present:
            return []
        clauses: list[str] = []
        params: list[Any] = []
        tests = {
            "subject": ("subject = ?", where.subject),
            "status": ("status = ?", where.status),
            "reason": ("reason = ?", where.reason),
            "client": ("client = ?", where.client),
        }
        for column, (clause, value) in tests.items():
            if value is None:
                continue
            if column not in present:
                raise AuditQueryError(f"this audit database has no {column!r} column (older)")
            clauses.append(clause)
            params.append(value)
        if where.since is not None:
            clauses.append("unix >= ?")
            params.append(where.since)
        if where.until is not None:
            clauses.append("unix < ?")
            params.append(where.until)
        wanted = ["id", *(c for c in COLUMNS if c in present)]
        sql = "SELECT " + ", ".join(f'"{c}"' for c in wanted) + " FROM audit"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(where.limit)
        found = conn.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise AuditQueryError(f"cannot read the audit database: {exc}") from None
    defaults = dict.fromkeys(COLUMNS) | {"count": 1}
    return [defaults | dict(zip(wanted, row, strict=True)) for row in found]


def rows_since(conn: sqlite3.Connection, since: float) -> dict[str, int]:
    """Rows predicted per subject since ``since`` (unix seconds): the daily quotas' start."""
    try:
        found = conn.execute(
            "SELECT subject, SUM(rows) FROM audit WHERE unix >= ? AND status = 200 "
            "AND subject IS NOT NULL AND rows IS NOT NULL GROUP BY subject",
            (since,),
        ).fetchall()
    except sqlite3.Error as exc:
        raise AuditQueryError(f"cannot read the audit database: {exc}") from None
    return {str(subject): int(total) for subject, total in found}


def utc(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")
