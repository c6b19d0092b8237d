"""The institution's own record of each round, for its console.

A deployed node's ClientApp appends one JSON line per request it answers (a training round, a
study's statistics or evaluation) to ``<ledger dir>/rounds-<name>.jsonl``: when, which round,
the status (trained, refused and why, failed and why), the epsilon spent against the node's
budget, and how long it took. ``fedaiot node start`` prints each line as it lands. The file
stays on the node: it may say more than the wire does (a refusal's full reason).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedaiot.node.deployed import NodeSettings

LOG_NAME = "rounds-{name}.jsonl"


def log_path(settings: NodeSettings) -> Path:
    return settings.ledger_dir / LOG_NAME.format(name=settings.node_name)


def record(
    settings: NodeSettings,
    *,
    what: str,
    status: str,
    reason: str = "",
    detail: str = "",
    epsilon: float | None = None,
    budget: float | None = None,
    seconds: float | None = None,
) -> None:
    """Append one line; a console that cannot be written never fails the round."""
    event = {
        "time": time.time(),
        "what": what,
        "status": status,
        "reason": reason,
        "detail": detail,
        "epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
        "budget": budget,
        "seconds": seconds,
    }
    try:
        settings.ledger_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path(settings), "a") as handle:
            handle.write(json.dumps(event) + "\n")
    except OSError:
        pass


def what_of(config: Mapping[str, Any]) -> str:
    """ "round 3", or a study's "statistics" / "evaluation after round 4"."""
    purpose = str(config.get("purpose", ""))
    server_round = config.get("server-round")
    if purpose == "statistics":
        return "statistics"
    if purpose == "evaluation":
        return f"evaluation after round {server_round}"
    return f"round {server_round}"


def line(event: Mapping[str, Any]) -> str:
    """One console line: time, what, status (and why), epsilon against budget, seconds."""
    when = time.strftime("%H:%M:%S", time.localtime(float(event.get("time", 0.0))))
    parts = [when, f"{event.get('what', '?'):<10}", f"{event.get('status', '?'):<8}"]
    if event.get("reason"):
        why = str(event["reason"])
        parts.append(f"{why}: {event['detail']}" if event.get("detail") else why)
    epsilon, budget = event.get("epsilon"), event.get("budget")
    if epsilon is not None:
        parts.append(f"epsilon {epsilon:.3f}" + (f" of {budget:.3f}" if budget else ""))
    if event.get("seconds") is not None:
        parts.append(f"{event['seconds']:.2f} s")
    return "  ".join(parts)


class Follower:
    """The lines a round log gained since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        events = []
        for raw in complete.splitlines():
            try:
                events.append(json.loads(raw))
            except ValueError:
                continue
        return events
