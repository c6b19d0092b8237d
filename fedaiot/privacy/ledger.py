"""The node's privacy ledger: one JSON file per data set, on the node's disk, that never forgets.

A ledger is found by the data's fingerprint (:func:`dataset_fingerprint`: the records, in any
order), never by a name: the same records under another node name, another run, another study
or another file format draw on the same budget. It holds the accountant history of the data
across every round of every run, the noise plan of each run, the data set's one noisy count,
and a line per charged round. A restarted node, or a new run over the same data, reads it back
and goes on from the epsilon already spent. It is plain JSON (never pickle), written
atomically under an exclusive lock (a crash leaves the old or the new file, never half of one).

Ledgers of the first format (``ledger-<node name>.json`` and simulated ``node-N.json``) are
read too: the first time a data set's ledger is opened in a folder, every older ledger there
of the same data is folded into it and renamed ``*.adopted``, so no spend is ever lost.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from fedaiot.errors import BadInputError
from fedaiot.privacy.accounting import ACCOUNTANT, epsilon_spent
from fedaiot.privacy.rdp import SkellamEntry, epsilon_composed

if TYPE_CHECKING:
    from fedaiot.tasks import ArrayData

LEDGER_FORMAT = "fedaiot-privacy-ledger/2"
FORMATS = ("fedaiot-privacy-ledger/1", LEDGER_FORMAT)


class LedgerError(BadInputError):
    """The ledger file is unreadable, malformed, or belongs to other data."""

    reason = "ledger-error"


class NoisePlan(BaseModel):
    """The noise chosen once for a run's whole participation."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str = "rdp"  # plans of the first format were made with the RDP accountant


class RoundEntry(BaseModel):
    """One charged round. ``released`` turns true once anything computed from the round's
    training left the node; a charge never released is returned when the round is over."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    examples: int
    released: bool = True  # the first format charged only what it sent
    refunded: bool = False
    time: float = Field(default_factory=time.time)
    # A distributed round (``mode = "distributed"``): its Skellam step's sensitivities, the
    # noise multiplier of this node's share alone, and the epsilon that share alone gives.
    mode: str = "local"
    l2: float = 0.0
    l1: float = 0.0
    share_noise_multiplier: float = 0.0
    local_epsilon: float | None = None

    def skellam_steps(self) -> tuple[SkellamEntry, SkellamEntry]:
        """The round's entries in the distributed and in the share-alone histories."""
        return (
            (self.noise_multiplier, self.sample_rate, self.steps, self.l2, self.l1),
            (self.share_noise_multiplier, self.sample_rate, self.steps, self.l2, self.l1),
        )


class ReleaseEntry(BaseModel):
    """A release other than a training round (federated statistics or evaluation), as charged.

    ``side`` says which records it touched: ``train`` (the training records, the same history
    as the rounds) or ``test`` (the node's held-out test split, a history of its own)."""

    run: str
    kind: str
    side: str
    noise_multiplier: float
    epsilon: float
    time: float = Field(default_factory=time.time)


class CountRelease(BaseModel):
    """The data set's size, released once with Gaussian noise and reused by every run."""

    value: int
    noise: float
    run: str
    time: float = Field(default_factory=time.time)


class LedgerRecord(BaseModel):
    format: str = LEDGER_FORMAT
    dataset: str
    node: str = ""  # the last name the node ran under: for people, never a key
    history: list[tuple[float, float, int]] = Field(default_factory=list)
    # Releases computed from the held-out test records only: a record is on one side or the
    # other (decided by the record alone), so the two sides compose in parallel.
    test_history: list[tuple[float, float, int]] = Field(default_factory=list)
    # Distributed rounds (Skellam shares inside secure aggregation): the sum's noise, valid
    # while at most dp-collusion nodes collude, and this node's share alone (no trust at all).
    skellam_history: list[tuple[float, float, int, float, float]] = Field(default_factory=list)
    share_history: list[tuple[float, float, int, float, float]] = Field(default_factory=list)
    plans: dict[str, NoisePlan] = Field(default_factory=dict)
    rounds: list[RoundEntry] = Field(default_factory=list)
    releases: list[ReleaseEntry] = Field(default_factory=list)
    count: CountRelease | None = None
    adopted: list[str] = Field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        """The data set's epsilon: the larger of its two sides' (parallel composition); for
        distributed rounds, under their trust assumption."""
        return max(self.train_epsilon(delta), epsilon_spent(self.test_history, delta))

    def train_epsilon(self, delta: float, *, shares_alone: bool = False) -> float:
        """The training side's epsilon: the PLD for local rounds only, else the Rényi-DP
        composition of every local and distributed step (``shares_alone``: each distributed
        step as this node's own noise share alone, trusting no one)."""
        skellam = self.share_history if shares_alone else self.skellam_history
        if not skellam:
            return epsilon_spent(self.history, delta)
        return epsilon_composed(self.history, skellam, delta)

    def local_epsilon(self, delta: float) -> float:
        """What the data set's epsilon is if every other node colludes with the coordinator."""
        test = epsilon_spent(self.test_history, delta)
        return max(self.train_epsilon(delta, shares_alone=True), test)


def dataset_fingerprint(data: ArrayData) -> str:
    """SHA-256 over the sorted digests of the records: the same records in any order, from
    CSV or Parquet, give the same fingerprint; one record more or less gives another."""
    rows = data.x.reshape(len(data), -1)
    digests = sorted(
        hashlib.sha256(row.tobytes() + label.tobytes()).digest()
        for row, label in zip(rows, data.y, strict=True)
    )
    outer = hashlib.sha256(f"fedaiot-records/1:{data.x.shape[1:]}".encode())
    for digest in digests:
        outer.update(digest)
    return outer.hexdigest()


def legacy_fingerprint(data: ArrayData) -> str:
    """The fingerprint ledgers of the first format were tied to (order-dependent)."""
    import numpy as np

    digest = hashlib.sha256()
    digest.update(str(data.x.shape).encode())
    digest.update(np.ascontiguousarray(data.x).tobytes())
    digest.update(np.ascontiguousarray(data.y).tobytes())
    return digest.hexdigest()


def ledger_path(folder: Path, dataset: str) -> Path:
    return Path(folder) / f"ledger-{dataset[:32]}.json"


def _parse(data: bytes, path: Path) -> LedgerRecord:
    try:
        record = LedgerRecord.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise LedgerError(f"privacy ledger {path} is unreadable: {first}") from None
    if record.format not in FORMATS:
        raise LedgerError(f"privacy ledger {path} has unknown format {record.format!r}")
    return record


class PrivacyLedger:
    """Read and update one data set's ledger file under an exclusive lock.

    ``also`` names other fingerprints the same records had under an older scheme: their
    ledgers in the same folder are adopted when this one is first created.
    """

    def __init__(self, path: Path, *, dataset: str, also: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self.also = frozenset(also)

    @classmethod
    def for_data(cls, folder: Path, data: ArrayData, *, dataset: str = "") -> PrivacyLedger:
        """The ledger of ``data`` in ``folder`` (``dataset`` overrides the fingerprint)."""
        dataset = dataset or dataset_fingerprint(data)
        return cls(ledger_path(folder, dataset), dataset=dataset, also=[legacy_fingerprint(data)])

    def read(self) -> LedgerRecord:
        if not self.path.exists():
            return LedgerRecord(dataset=self.dataset)
        try:
            record = _parse(self.path.read_bytes(), self.path)
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path} is unreadable: {exc}") from None
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
                fresh = not self.path.exists()
                record = self.read()
                if fresh:
                    self._adopt(record)
                yield record
                self._write(record)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _adopt(self, record: LedgerRecord) -> None:
        """Fold in the older ledgers of the same records found next to this one."""
        for path in sorted(self.path.parent.glob("*.json")):
            if path == self.path:
                continue
            try:
                old = _parse(path.read_bytes(), path)
            except (LedgerError, OSError):
                continue  # not a ledger: leave it alone
            if old.dataset != self.dataset and old.dataset not in self.also:
                continue
            record.history = [*record.history, *old.history]
            record.test_history = [*record.test_history, *old.test_history]
            record.skellam_history = [*record.skellam_history, *old.skellam_history]
            record.share_history = [*record.share_history, *old.share_history]
            record.releases = [*record.releases, *old.releases]
            record.rounds = [*record.rounds, *old.rounds]
            record.plans = {**old.plans, **record.plans}
            record.count = record.count or old.count
            record.node = record.node or old.node
            record.adopted.append(path.name)
            os.replace(path, path.with_name(path.name + ".adopted"))

    def _write(self, record: LedgerRecord) -> None:
        record.format = LEDGER_FORMAT
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(record.model_dump_json(indent=1))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def epsilon(self, delta: float) -> float:
        return self.read().epsilon(delta)


def summarize(path: Path) -> dict[str, Any]:
    """A ledger file read without knowing its data set, for ``fedaiot ledger show``."""
    try:
        record = _parse(Path(path).read_bytes(), Path(path))
    except OSError as exc:
        raise LedgerError(f"privacy ledger {path} is unreadable: {exc}") from None
    delta = record.rounds[-1].delta if record.rounds else 1e-5
    return {
        "dataset": record.dataset,
        "node": record.node,
        "rounds": len([r for r in record.rounds if not r.refunded]),
        "refunded_rounds": len([r for r in record.rounds if r.refunded]),
        "delta": delta,
        "epsilon": record.epsilon(delta),
        "epsilon_local": record.local_epsilon(delta),
        "epsilon_test_split": epsilon_spent(record.test_history, delta),
        "releases": len(record.releases),
        "accountant": ACCOUNTANT if not record.skellam_history else "rdp (local and skellam steps)",
        "noisy_count": record.count.value if record.count else None,
        "history": record.history,
        "skellam_history": record.skellam_history,
        "share_history": record.share_history,
        "test_history": record.test_history,
        "adopted": record.adopted,
    }
