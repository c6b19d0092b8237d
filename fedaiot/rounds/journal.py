"""A run's journal: an append-only JSON-lines file of what the coordinator did, round by round.

The coordinator writes it; ``fedaiot simulate`` follows it to draw progress, and reads the
final summary from it. Values are plain JSON (infinite epsilon is written as null).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

JOURNAL = "journal.jsonl"
SUMMARY = "summary.json"


def jsonable(value: Any) -> Any:
    """Replace NaN and infinities (not JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL

    def append(self, event: str, **fields: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(jsonable({"event": event, **fields}), allow_nan=False)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def events(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Complete events from byte ``offset`` on, and the offset to read from next time."""
        if not self.path.exists():
            return [], offset
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        events = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return events, offset + len(complete)

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.folder / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False))
        os.replace(tmp, self.folder / SUMMARY)

    def read_summary(self) -> dict[str, Any] | None:
        path = self.folder / SUMMARY
        return json.loads(path.read_text()) if path.exists() else None
