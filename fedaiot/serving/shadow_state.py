"""Shadow reports kept on disk, so that a restarted service keeps the evidence it gathered.

One JSON file (``<registry>/shadow.json``, ``fedaiot-shadow/1``): per candidate its counts
(agreement per served version, dropped and failed rows, both class mixes), when it started and
stopped, and the gate's decision. Counts only, as in memory: never an input.

Who can change it: whoever can write the registry folder, who can already point the ``served``
ref at any signed version; forged agreement buys nothing more than that (docs/operations.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedaiot.registry.files import replace

log = logging.getLogger(__name__)
FORMAT = "fedaiot-shadow/1"
SHADOW_FILE = "shadow.json"


class SavedCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    started: float
    stopped: float | None
    by_served: dict[str, tuple[int, int]]  # served -> (agreed, rows)
    dropped: int = Field(ge=0)
    failed: int = Field(ge=0)
    class_names: list[str]
    candidate_mix: list[int]
    served_mix: list[int]
    decision: dict[str, Any] | None = None


class SavedShadow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    candidates: list[SavedCandidate] = Field(default_factory=list)


def read_saved(path: Path) -> list[SavedCandidate]:
    """The candidates saved at ``path``; none when there is no file. An unreadable file is
    logged and left as it is (it is replaced at the next save): monitoring never stops the
    service."""
    if not path.exists():
        return []
    try:
        saved = SavedShadow.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        log.error("shadow reports %s unreadable, starting without them: %s", path, exc)
        return []
    if saved.format != FORMAT:
        log.error("shadow reports %s: not a %s file, starting without them", path, FORMAT)
        return []
    return saved.candidates


def write_saved(path: Path, candidates: list[SavedCandidate]) -> None:
    """Replace the file at once (a reader never sees half of it); a failure is logged."""
    try:
        replace(path, SavedShadow(candidates=candidates).model_dump_json().encode())
    except OSError as exc:
        log.error("shadow reports not saved to %s: %s", path, exc)
