"""``fedaiot audit``: who tried what, from the inference service's audit log (read-only).

Reads the SQLite file directly, so it works while the service runs (WAL mode) and when it is
down. Imports nothing heavy: no torch, no FastAPI.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from fedaiot.errors import BadInputError

_AGO = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SHOWN = ["time", "status", "reason", "count", "subject", "role", "client", "method", "endpoint",
          "rows", "model_version", "jti", "note"]  # fmt: skip


def parse_when(text: str, now: float | None = None) -> float:
    """Unix seconds of ``2h`` / ``30m`` / ``7d`` ago, or of an ISO date or time (UTC unless it
    names its zone)."""
    now = time.time() if now is None else now
    match = _AGO.match(text.strip())
    if match:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInputError(f"{text!r}: use e.g. 2h, 30m, 7d or 2026-05-01T08:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _database(target: Path) -> Path:
    return target / "audit.sqlite3" if target.is_dir() else target


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[("" if row.get(c) is None else str(row[c])) for c in _SHOWN] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(_SHOWN)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_SHOWN, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def audit(
    target: Annotated[
        Path, typer.Argument(help="the audit database, or the registry folder holding it")
    ],
    subject: Annotated[str | None, typer.Option(help="only this token subject")] = None,
    status: Annotated[int | None, typer.Option(help="only this HTTP status, e.g. 401")] = None,
    reason: Annotated[
        str | None, typer.Option(help="only this reason code, e.g. bad_signature")
    ] = None,
    client: Annotated[str | None, typer.Option(help="only this client address")] = None,
    since: Annotated[
        str | None, typer.Option(help="from: 2h, 30m, 7d ago, or an ISO time (UTC)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="before: same forms as --since")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="newest rows shown")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """Query the inference service's audit log: by subject, status, reason, client and time."""
    from fedaiot.serving.audit_query import AuditFilter, open_read_only, select

    where = AuditFilter(
        subject=subject,
        status=status,
        reason=reason,
        client=client,
        since=parse_when(since) if since else None,
        until=parse_when(until) if until else None,
        limit=limit,
    )
    conn = open_read_only(_database(target))
    try:
        rows = select(conn, where)
    finally:
        conn.close()
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(_table(rows))
    calls = sum(int(row.get("count") or 1) for row in rows)
    print(f"{len(rows)} rows ({calls} calls), newest first", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
