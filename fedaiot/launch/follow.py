"""Following a run through the coordinator's journal, to its outcome.

``flwr run`` exits 0 even when the run failed, so the outcome is read from the journal the
ServerApp writes: its ``end`` event (with the coordinator's status) or a ``failed`` event.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedaiot.launch.processes import LaunchError
from fedaiot.rounds.journal import Journal

Event = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    status: str  # the coordinator's status ("completed", "budget-exhausted", ...) or "failed"
    summary: dict[str, Any]
    error: str
    wall_seconds: float
    log: Path


def follow(
    journal: Journal,
    offset: int,
    on_event: Callable[[Event], None],
    *,
    runner: subprocess.Popen[bytes] | None = None,
    superlink: subprocess.Popen[bytes] | None = None,
    finished: Callable[[], str] | None = None,
    check_every: float = 30.0,
) -> list[Event]:
    """The journal's events from ``offset`` on, passed to ``on_event``, until the run's last.

    The run is over at its ``end`` or ``failed`` event, when ``runner`` (a streaming ``flwr
    run``) exits, or when ``finished`` (asked every ``check_every`` s) names a finished status.
    A ``superlink`` that exits first is an error.
    """
    seen: list[Event] = []
    checked = time.monotonic()
    while True:
        over = runner is not None and runner.poll() is not None
        events, offset = journal.events(offset)
        for event in events:
            seen.append(event)
            on_event(event)
        if any(e["event"] in ("end", "failed") for e in events):
            if runner is not None and not over:
                runner.wait(timeout=60)
            return seen
        if over:
            return seen
        if superlink is not None and superlink.poll() is not None:
            raise LaunchError(f"the SuperLink exited with code {superlink.returncode}")
        if finished is not None and time.monotonic() - checked > check_every:
            checked = time.monotonic()
            status = finished()
            if status:
                time.sleep(1.0)  # the journal's last lines may land just after the status
                for event in journal.events(offset)[0]:
                    seen.append(event)
                    on_event(event)
                if not any(e["event"] in ("end", "failed") for e in seen):
                    seen.append({"event": "failed", "error": f"the run is {status}"})
                return seen
        time.sleep(0.25)


def outcome(events: list[Event], journal: Journal, wall_seconds: float, log: Path) -> Outcome:
    """What the events say of the run: the coordinator's status, or failed and why."""
    failed = next((e for e in events if e["event"] == "failed"), None)
    end = next((e for e in events if e["event"] == "end"), None)
    summary = journal.read_summary() or {}
    if failed or end is None:
        error = failed["error"] if failed else f"the run ended without a result: see {log}"
        return Outcome("failed", summary, error, wall_seconds, log)
    return Outcome(end["status"], summary, "", wall_seconds, log)
