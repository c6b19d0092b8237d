"""A node's records in cohorts: records seen together first share one ledger, for good.

Data grows. A hospital's file gains a week of records; a device keeps measuring. The budget is
per record, so the records a node trained on before keep every bit of their spend, and records
it has never used bring a budget of their own. A node's ledger folder therefore keeps an index
of *cohorts*: the first time a node opens its data, all its records are one cohort; when it
opens a file holding records it has not seen, those records become a new cohort with a fresh
ledger, and the records it has seen stay in theirs. A round trains on the records of every
cohort whose ledger can pay for it (``fedaiot.privacy.budget.decide_cohorts``), and charges
each of those ledgers.

A cohort is named by the fingerprint of the records it was made with
(:func:`fedaiot.privacy.ledger.dataset_fingerprint`), which is also its ledger's name: a node
whose data never grows has one cohort whose ledger is exactly the one-ledger-per-data-set of
earlier versions. Records are recognised by their SHA-256 digests, kept in the node's own
ledger folder (``cohort-<id>.digests``, raw bytes, never pickled); a record removed from the
file leaves its cohort's spend as it was (a subset's spend is at most its set's). Two copies of
one record in a file are one record to the index.

What the operator must do: keep the ledger folder with the data (``--ledger-dir``), as before:
a fresh folder knows no records and would give every record a fresh budget.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedaiot.privacy.budget import BudgetTerms, Decision, decide, decide_distributed
from fedaiot.privacy.distributed import ShareGeometry
from fedaiot.privacy.ledger import LedgerError, NoisePlan, PrivacyLedger, ledger_path
from fedaiot.privacy.randomness import SecureRandom

if TYPE_CHECKING:
    from fedaiot.tasks import ArrayData

INDEX_FILE = "cohorts.json"
INDEX_FORMAT = "fedaiot-cohorts/1"
DIGEST_BYTES = 32


def record_digests(data: ArrayData) -> list[bytes]:
    """Each record's SHA-256 over its values and its label (the fingerprint's own digests)."""
    rows = data.x.reshape(len(data), -1)
    return [
        hashlib.sha256(row.tobytes() + label.tobytes()).digest()
        for row, label in zip(rows, data.y, strict=True)
    ]


def fingerprint(digests: list[bytes], sample_shape: tuple[int, ...]) -> str:
    """:func:`fedaiot.privacy.ledger.dataset_fingerprint` of the records with these digests."""
    outer = hashlib.sha256(f"fedaiot-records/1:{sample_shape}".encode())
    for digest in sorted(digests):
        outer.update(digest)
    return outer.hexdigest()


@dataclass(frozen=True)
class Cohort:
    """One cohort's records in the node's current data, and its ledger."""

    id: str
    rows: np.ndarray  # indices into the data the node opened
    ledger: PrivacyLedger

    def __len__(self) -> int:
        return int(self.rows.size)


def open_cohorts(folder: Path, data: ArrayData) -> list[Cohort]:
    """The cohorts of ``data``'s records, oldest first; records never seen become a new one.

    Only cohorts holding at least one of ``data``'s records are returned.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digests = record_digests(data)
    shape = tuple(data.x.shape[1:])
    with _locked(folder):
        index = _read_index(folder)
        known = {d: i for i, entry in enumerate(index) for d in _read_digests(folder, entry["id"])}
        owner = np.array([known.get(d, -1) for d in digests], dtype=np.int64)
        fresh = sorted({d for d, o in zip(digests, owner, strict=True) if o < 0})
        if fresh:
            # the first cohort is the data set as earlier versions named it (duplicates and all)
            cohort = fingerprint(digests, shape) if not index else fingerprint(fresh, shape)
            _write_digests(folder, cohort, fresh)
            index.append({"id": cohort, "records": len(fresh)})
            _write_index(folder, index)
            new = len(index) - 1
            owner = np.where(owner < 0, new, owner)
    return [
        Cohort(entry["id"], np.flatnonzero(owner == i), _ledger(folder, entry["id"], data, i))
        for i, entry in enumerate(index)
        if (owner == i).any()
    ]


def _ledger(folder: Path, cohort: str, data: ArrayData, position: int) -> PrivacyLedger:
    from fedaiot.privacy.ledger import legacy_fingerprint

    # the first cohort adopts ledgers of the first format for the same records
    also = [legacy_fingerprint(data)] if position == 0 else []
    return PrivacyLedger(ledger_path(folder, cohort), dataset=cohort, also=also)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / f"{INDEX_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_index(folder: Path) -> list[dict[str, Any]]:
    path = folder / INDEX_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != INDEX_FORMAT or not isinstance(data.get("cohorts"), list):
            raise ValueError(f"unknown format {data.get('format')!r}")
        return [{"id": str(c["id"]), "records": int(c["records"])} for c in data["cohorts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"the cohort index {path} is unreadable: {exc}") from None


def _write_index(folder: Path, index: list[dict[str, Any]]) -> None:
    path = folder / INDEX_FILE
    tmp = path.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": INDEX_FORMAT, "cohorts": index}, indent=1))
    os.replace(tmp, path)


def _digest_path(folder: Path, cohort: str) -> Path:
    return folder / f"cohort-{cohort[:32]}.digests"


def _read_digests(folder: Path, cohort: object) -> list[bytes]:
    path = _digest_path(folder, str(cohort))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"the cohort's record digests {path} are unreadable: {exc}") from None
    if len(raw) % DIGEST_BYTES:
        raise LedgerError(f"the cohort's record digests {path} are truncated")
    return [raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)]


def _write_digests(folder: Path, cohort: str, digests: list[bytes]) -> None:
    path = _digest_path(folder, cohort)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"".join(digests))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class CohortDecision:
    """A round's answer over all of a node's cohorts."""

    granted: bool
    epsilon: float  # the largest of the cohorts' epsilons: what the node's worst-off record has
    rows: np.ndarray  # the records the round may use: those of the cohorts it charged
    charged: list[Cohort]
    plan: NoisePlan | None = None
    weight: float = 0.0  # the charged cohorts' noisy counts, summed
    reason: str = ""
    local_epsilon: float = math.nan


def decide_cohorts(
    cohorts: list[Cohort],
    terms: BudgetTerms,
    *,
    run: str,
    server_round: int,
    randomness: SecureRandom,
    distributed: tuple[ShareGeometry, int] | None = None,
) -> CohortDecision:
    """Charge the round to every cohort that can pay for it, newest first, or refuse it.

    In local DP the newest cohort that can pay plans the run's noise (it has the most budget
    left, so the run's noise is sized for the records that bring it); older cohorts take part
    at that noise while they can afford it, and sit the round out once they cannot. In
    distributed DP the noise is the run's, whatever the cohort (``decide_distributed``).
    """
    charged: list[tuple[Cohort, Decision]] = []
    refusals: list[Decision] = []
    plan: NoisePlan | None = None
    for cohort in reversed(cohorts):
        if distributed is not None:
            geometry, honest = distributed
            decision = decide_distributed(
                cohort.ledger, terms, run=run, server_round=server_round, examples=len(cohort),
                randomness=randomness, geometry=geometry, honest=honest,
            )  # fmt: skip
        else:
            decision = decide(
                cohort.ledger, terms, run=run, server_round=server_round, examples=len(cohort),
                randomness=randomness, plan=plan,
            )  # fmt: skip
        if decision.granted:
            charged.append((cohort, decision))
            plan = plan or decision.plan
        else:
            refusals.append(decision)
    if not charged:
        epsilon = max(d.epsilon for d in refusals)
        return CohortDecision(False, epsilon, np.empty(0, np.int64), [], reason=refusals[0].reason)
    rows = np.sort(np.concatenate([c.rows for c, _ in charged]))
    return CohortDecision(
        True,
        max(d.epsilon for _, d in charged),
        rows,
        [c for c, _ in charged],
        plan=charged[0][1].plan,
        weight=float(sum(d.weight for _, d in charged)),
        local_epsilon=max((d.local_epsilon for _, d in charged), key=_finite_first),
    )


def _finite_first(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def restrict(cohorts: list[Cohort], keep: np.ndarray) -> list[Cohort]:
    """The cohorts seen from the subset ``keep`` of the rows (a study's training or test
    split): rows renumbered into the subset, empty cohorts dropped."""
    position = np.full(max((int(c.rows.max()) for c in cohorts if len(c)), default=-1) + 1, -1)
    position[keep[keep < position.size]] = np.arange(int((keep < position.size).sum()))
    out = []
    for cohort in cohorts:
        mapped = position[cohort.rows]
        mapped = np.sort(mapped[mapped >= 0])
        if mapped.size:
            out.append(Cohort(cohort.id, mapped, cohort.ledger))
    return out
