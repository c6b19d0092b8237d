"""The node's privacy ledger: a JSON file next to the node's data that never forgets.

The ledger holds the accountant history of one data set across every round of every run, the
noise plan of each run, and a line per trained round. A node restarted mid-run, or a new run
over the same data, reads it back and goes on from the epsilon already spent. It is plain JSON
(never pickle), written atomically (a crash leaves the old or the new file, never half of one),
and tied to the data by a fingerprint so that a ledger is never applied to other data.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from fedaiot.privacy.accounting import epsilon_spent

LEDGER_FORMAT = "fedaiot-privacy-ledger/1"


class LedgerError(RuntimeError):
    """The ledger file is unreadable, malformed, or belongs to other data."""


class NoisePlan(BaseModel):
    """The noise chosen once for a run's whole participation."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float


class RoundEntry(BaseModel):
    """One round of local training, as it was accounted."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    examples: int
    time: float = Field(default_factory=time.time)


class LedgerRecord(BaseModel):
    format: str = LEDGER_FORMAT
    node: str
    dataset: str
    history: list[tuple[float, float, int]] = Field(default_factory=list)
    plans: dict[str, NoisePlan] = Field(default_factory=dict)
    rounds: list[RoundEntry] = Field(default_factory=list)


class PrivacyLedger:
    """Read and update one node's ledger file under an exclusive lock."""

    def __init__(self, path: Path, *, node: str, dataset: str) -> None:
        self.path = Path(path)
        self.node = node
        self.dataset = dataset

    def read(self) -> LedgerRecord:
        if not self.path.exists():
            return LedgerRecord(node=self.node, dataset=self.dataset)
        try:
            record = LedgerRecord.model_validate_json(self.path.read_bytes())
        except (ValidationError, ValueError, OSError) as exc:
            first = str(exc).splitlines()[0]
            raise LedgerError(f"privacy ledger {self.path} is unreadable: {first}") from None
        if record.format != LEDGER_FORMAT:
            raise LedgerError(f"privacy ledger {self.path} has unknown format {record.format!r}")
        if record.dataset != self.dataset:
            raise LedgerError(
                f"privacy ledger {self.path} belongs to another data set "
                f"({record.dataset[:12]}, this data is {self.dataset[:12]}): refusing to mix them"
            )
        return record

    @contextmanager
    def update(self) -> Iterator[LedgerRecord]:
        """Lock, read, let the caller change the record, and write it back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                record = self.read()
                yield record
                self._write(record)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, record: LedgerRecord) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(record.model_dump_json(indent=1))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def epsilon(self, delta: float) -> float:
        return epsilon_spent(self.read().history, delta)


def summarize(path: Path) -> dict[str, Any]:
    """A ledger file read without knowing its data set, for ``fedaiot ledger show``."""
    try:
        record = LedgerRecord.model_validate_json(Path(path).read_bytes())
    except (ValidationError, ValueError, OSError) as exc:
        raise LedgerError(
            f"privacy ledger {path} is unreadable: {str(exc).splitlines()[0]}"
        ) from None
    delta = record.rounds[-1].delta if record.rounds else 1e-5
    return {
        "node": record.node,
        "dataset": record.dataset,
        "rounds": len(record.rounds),
        "delta": delta,
        "epsilon": epsilon_spent(record.history, delta),
        "history": record.history,
    }
