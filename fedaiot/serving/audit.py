"""The service's audit log: one SQLite row per API call, never the input data.

A row says who (token subject and role), when, which endpoint, which model version, how many
rows were predicted, the outcome (HTTP status) and how long it took; model management adds a
short note (e.g. why a promotion was refused). Request bodies, features and predictions are
never written.

Requests only enqueue their row; one writer thread owns the connection and commits in batches,
so a request never waits for the disk. ``flush`` waits until everything enqueued so far is
committed (``query`` flushes first). The database runs in WAL mode, so readers do not block the
writer. Uses the standard library's ``sqlite3``.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    unix REAL NOT NULL,
    request_id TEXT NOT NULL,
    subject TEXT,
    role TEXT,
    method TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model_version TEXT,
    rows INTEGER,
    status INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    note TEXT
)
"""
_BATCH = 512


class AuditError(RuntimeError):
    """The audit database cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: str
    unix: float
    request_id: str
    subject: str | None
    role: str | None
    method: str
    endpoint: str
    model_version: str | None
    rows: int | None
    status: int
    duration_ms: float
    note: str | None


_COLUMNS = [f.name for f in fields(AuditRecord)]
_INSERT = f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def make_record(
    *,
    request_id: str,
    method: str,
    endpoint: str,
    status: int,
    duration_ms: float,
    subject: str | None = None,
    role: str | None = None,
    model_version: str | None = None,
    rows: int | None = None,
    note: str | None = None,
) -> AuditRecord:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    return AuditRecord(
        stamp,
        now,
        request_id,
        subject,
        role,
        method,
        endpoint,
        model_version,
        rows,
        status,
        round(duration_ms, 3),
        note,
    )


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.failures = 0  # rows that could not be written (also logged)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            conn.commit()
        except (sqlite3.Error, OSError) as exc:
            raise AuditError(f"cannot open the audit database {self.path}: {exc}") from None
        self._queue: queue.SimpleQueue[AuditRecord | threading.Event | None] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._run, args=(conn,), name="fedaiot-audit", daemon=True
        )
        self._writer.start()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def record(self, record: AuditRecord) -> None:
        """Enqueue one row (never blocks on the disk)."""
        self._queue.put(record)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row enqueued before this call is committed."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def query(self, limit: int = 100, subject: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` rows (optionally of one subject), newest first."""
        self.flush()
        sql = "SELECT id, " + ", ".join(_COLUMNS) + " FROM audit"
        params: list[Any] = []
        if subject is not None:
            sql += " WHERE subject = ?"
            params.append(subject)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        conn = self._connect()
        try:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql, params)]
        except sqlite3.Error as exc:
            raise AuditError(f"cannot read the audit database {self.path}: {exc}") from None
        finally:
            conn.close()

    def close(self) -> None:
        """Write what is queued and stop the writer."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._writer.join(timeout=10.0)

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                item = self._queue.get()
                rows: list[AuditRecord] = []
                waiters: list[threading.Event] = []
                stop = False
                while True:
                    if item is None:
                        stop = True
                    elif isinstance(item, threading.Event):
                        waiters.append(item)
                    else:
                        rows.append(item)
                    if stop or len(rows) >= _BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._write(conn, rows)
                for waiter in waiters:
                    waiter.set()
                if stop:
                    return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, rows: list[AuditRecord]) -> None:
        if not rows:
            return
        try:
            with conn:
                conn.executemany(_INSERT, [astuple(row) for row in rows])
        except sqlite3.Error as exc:
            self.failures += len(rows)
            log.error("audit: %d rows not written to %s: %s", len(rows), self.path, exc)
