"""The service's audit log: one SQLite row per API call, never the input data.

A row says who (token subject and role, token id), from where (client address), when, which
endpoint, which model version, how many rows were predicted, the outcome (HTTP status and a
reason code) and how long it took; model management adds a short note. Request bodies, features
and predictions are never written. Refused calls pass through a ``RefusalSampler`` first, so a
flood of them adds a bounded number of rows (see ``audit_sampling``).

Requests only enqueue their row; one writer thread owns the connection and commits in batches,
so a request never waits for the disk. ``flush`` waits until everything enqueued so far is
committed (``query`` flushes first). WAL mode: readers do not block the writer. The database and
its WAL files are readable by the service's user only (0600).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import astuple
from pathlib import Path
from typing import Any

from fedaiot.errors import FedaiotError
from fedaiot.serving.audit_query import AuditFilter, AuditQueryError, rows_since, select
from fedaiot.serving.audit_record import (
    COLUMN_TYPES,
    INDEXES,
    INSERT,
    SCHEMA,
    AuditRecord,
    make_record,
)
from fedaiot.serving.audit_sampling import RefusalSampler
from fedaiot.serving.settings import DAY

__all__ = ["AuditError", "AuditLog", "AuditRecord", "make_record"]

log = logging.getLogger(__name__)
_BATCH = 512
_TICK = 1.0  # seconds: how often the writer closes sampling windows when idle
_PRIVATE = 0o600


class AuditError(FedaiotError, RuntimeError):
    """The audit database cannot be opened or written."""


def _private_file(path: Path) -> None:
    """Create ``path`` (and tighten it and its WAL files) as 0600 before SQLite opens it:
    SQLite gives the -wal and -shm files the database file's mode."""
    # Only a file that does not exist yet is opened here: closing a descriptor of a database
    # that SQLite has open in this process drops every POSIX lock the process holds on it, and
    # another process (a campaign writing its rows) then took itself for the last connection
    # and removed the WAL under the service's feet ("disk I/O error").
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, _PRIVATE))
    for suffix in ("", "-wal", "-shm"):
        sibling = path.with_name(path.name + suffix)
        if sibling.exists():
            os.chmod(sibling, _PRIVATE)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns that a database of an older fedaiot lacks."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
    for name, kind in COLUMN_TYPES.items():
        if name not in present:
            conn.execute(f'ALTER TABLE audit ADD COLUMN "{name}" {kind}')
    for statement in INDEXES:
        conn.execute(statement)


class AuditLog:
    def __init__(self, path: Path, sampler: RefusalSampler | None = None) -> None:
        self.path = Path(path)
        self.failures = 0  # rows that could not be written (also logged)
        self._sampler = sampler
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _private_file(self.path)
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(SCHEMA)
            _migrate(conn)
            conn.commit()
            _private_file(self.path)
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
        """Enqueue one row (never blocks on the disk); a refusal may only be counted."""
        rows = self._sampler.admit(record) if self._sampler else [record]
        for row in rows:
            self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row enqueued before this call is committed, with the counts of
        refusals not written one by one so far."""
        if self._closed:
            return True
        for row in self._sampler.drain(force=True) if self._sampler else []:
            self._queue.put(row)
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def query(self, where: AuditFilter) -> list[dict[str, Any]]:
        """The newest rows matching ``where``, newest first."""
        self.flush()
        conn = self._connect()
        try:
            return select(conn, where)
        except AuditQueryError as exc:
            raise AuditError(str(exc)) from None
        finally:
            conn.close()

    def rows_today(self, now: float | None = None) -> dict[str, int]:
        """Rows predicted per subject since UTC midnight (seeds the daily quotas)."""
        now = time.time() if now is None else now
        conn = self._connect()
        try:
            return rows_since(conn, now - now % DAY)
        except AuditQueryError as exc:
            raise AuditError(str(exc)) from None
        finally:
            conn.close()

    def close(self) -> None:
        """Write what is queued (and the refusal counts) and stop the writer."""
        if not self._closed:
            self.flush()
            self._closed = True
            self._queue.put(None)
            self._writer.join(timeout=10.0)

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=_TICK)
                except queue.Empty:
                    self._write(conn, self._sampler.drain() if self._sampler else [])
                    continue
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
                conn.executemany(INSERT, [astuple(row) for row in rows])
        except sqlite3.Error as exc:
            self.failures += len(rows)
            log.error("audit: %d rows not written to %s: %s", len(rows), self.path, exc)
