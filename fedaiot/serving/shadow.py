"""Shadow scoring: live predict batches scored again by candidate versions, off the request
path, and their agreement with the served version counted.

A predict call hands its checked batch and the served model's labels to ``submit`` once it has
answered them; one shadow thread runs each active candidate on it and counts agreement per
served version, and both models' class mix. The batch is dropped once scored: no input is
kept, only counts. The queue is bounded: when the shadow thread falls behind, batches are
dropped and counted (``dropped_rows``), so a slow candidate never slows callers.

With a state file (``<registry>/shadow.json``, :mod:`fedaiot.serving.shadow_state`) the reports
outlive the process: saved when a candidate starts, stops or is decided, every few seconds
while it counts, and at shutdown; a restarted service loads them, verifies and loads each
candidate that was active again (one that no longer verifies is stopped, and logged), and goes
on counting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from fedaiot.monitoring.gate import Counts, wilson
from fedaiot.serving.models import LoadedModel
from fedaiot.serving.shadow_state import SavedCandidate, read_saved, write_saved

log = logging.getLogger(__name__)
MAX_CANDIDATES = 4
_QUEUE = 256  # batches waiting for the shadow thread
_SAVE_EVERY = 5.0  # seconds between saves while candidates count


class ShadowError(LookupError):
    """A candidate that cannot be shadowed now (the message says why)."""


class ServedAgreement(BaseModel):
    rows: int
    agreed: int
    agreement: float | None


class ShadowReport(BaseModel):
    version: str
    active: bool
    started: float
    stopped: float | None
    rows: int = Field(description="rows scored by the candidate (against the current served)")
    agreed: int
    agreement: float | None
    agreement_interval: tuple[float, float] | None = Field(
        default=None, description="95 % Wilson interval of the agreement"
    )
    served: str | None = Field(description="the version agreement is counted against now")
    by_served: dict[str, ServedAgreement]
    dropped_rows: int = Field(description="rows not scored: the shadow queue was full")
    failed_rows: int = Field(description="rows the candidate gave no finite output for")
    candidate_class_mix: dict[str, int]
    served_class_mix: dict[str, int]
    decision: dict[str, Any] | None = None


@dataclass(slots=True)
class _Candidate:
    version: str
    class_names: list[str]
    model: LoadedModel | None  # None once stopped and restored from disk (nothing to run)
    started: float
    stopped: float | None = None
    by_served: dict[str, list[int]] = field(default_factory=dict)  # served -> [agreed, rows]
    dropped: int = 0
    failed: int = 0
    candidate_mix: np.ndarray | None = None
    served_mix: np.ndarray | None = None
    decision: dict[str, Any] | None = None


class Shadow:
    def __init__(
        self,
        load: Callable[[str], LoadedModel],
        current: Callable[[], LoadedModel],
        state: Path | None = None,
    ):
        self._load, self._current, self._state = load, current, state
        self._candidates: dict[str, _Candidate] = {}  # active and stopped, by version
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._saved_at = 0.0
        if state is not None:
            self._restore(read_saved(state))
        self._queue: queue.Queue[tuple[np.ndarray, str, np.ndarray] | None] = queue.Queue(_QUEUE)
        self._thread = threading.Thread(target=self._run, name="fedaiot-shadow", daemon=True)
        self._thread.start()

    def start(self, version: str) -> ShadowReport:
        """Verify and load ``version``, then score live traffic with it (ModelLoadError,
        ShadowError)."""
        served = self._current()
        if version == served.version:
            raise ShadowError(f"{version} is the served version")
        model = self._load(version)  # verified like a promotion
        if model.shape != served.shape or model.class_names != served.class_names:
            raise ShadowError(f"{version} does not take the served model's inputs and classes")
        with self._lock:
            active = [v for v, c in self._candidates.items() if c.stopped is None]
            if version not in active and len(active) >= MAX_CANDIDATES:
                raise ShadowError(f"{MAX_CANDIDATES} candidates are shadowed already")
            classes = len(model.class_names)
            self._candidates[version] = _Candidate(
                version, list(model.class_names), model, time.time(),
                candidate_mix=np.zeros(classes, dtype=np.int64),
                served_mix=np.zeros(classes, dtype=np.int64),
            )  # fmt: skip
        self._save()
        report = self.report(version)
        assert report is not None  # just added
        return report

    def stop(self, version: str) -> ShadowReport | None:
        with self._lock:
            candidate = self._candidates.get(version)
            if candidate is not None and candidate.stopped is None:
                candidate.stopped = time.time()
        self._save()
        return self.report(version)

    def active(self) -> list[str]:
        with self._lock:
            return sorted(v for v, c in self._candidates.items() if c.stopped is None)

    def decide(self, version: str, decision: dict[str, Any]) -> None:
        """Record the gate's decision on a candidate, and stop shadowing it."""
        with self._lock:
            candidate = self._candidates.get(version)
            if candidate is not None:
                candidate.decision = decision
                candidate.stopped = candidate.stopped or time.time()
        self._save()

    def agreement(self, version: str, served: str) -> Counts:
        with self._lock:
            candidate = self._candidates.get(version)
            agreed, rows = candidate.by_served.get(served, [0, 0]) if candidate else (0, 0)
        return Counts(agreed, rows)

    def submit(self, x: np.ndarray, served: LoadedModel, labels: np.ndarray) -> None:
        """A predicted batch and the served model's labels (from the inference thread)."""
        with self._lock:
            if not any(c.stopped is None for c in self._candidates.values()):
                return
        try:
            self._queue.put_nowait((x, served.version, labels))
        except queue.Full:
            with self._lock:
                for candidate in self._candidates.values():
                    if candidate.stopped is None:
                        candidate.dropped += len(labels)

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:
            self._save()
            return
        self._thread.join(5)
        self._save()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            x, served, labels = item
            with self._lock:
                active = [c for c in self._candidates.values() if c.stopped is None]
            for candidate in active:
                if candidate.version == served or candidate.model is None:
                    continue  # promoted meanwhile: it would agree with itself
                try:
                    probabilities = candidate.model.predict_proba(x)
                except Exception:  # a candidate's failure must never touch the service
                    log.exception("shadow: %s failed on a batch", candidate.version)
                    probabilities = np.full((len(labels), 1), np.nan)
                self._count(candidate, served, labels, probabilities)
            if time.monotonic() - self._saved_at >= _SAVE_EVERY:
                self._save()

    def _count(
        self, candidate: _Candidate, served: str, labels: np.ndarray, probabilities: np.ndarray
    ) -> None:
        finite = np.isfinite(probabilities).all(axis=1)
        said = np.where(finite, probabilities.argmax(axis=1), -1)
        assert candidate.candidate_mix is not None and candidate.served_mix is not None
        classes = len(candidate.candidate_mix)
        with self._lock:
            counts = candidate.by_served.setdefault(served, [0, 0])
            counts[0] += int((said == labels).sum())
            counts[1] += len(labels)
            candidate.failed += int((~finite).sum())
            candidate.candidate_mix += np.bincount(said[finite], minlength=classes)[:classes]
            candidate.served_mix += np.bincount(labels, minlength=classes)[:classes]

    def report(self, version: str) -> ShadowReport | None:
        served = self._current().version
        with self._lock:
            c = self._candidates.get(version)
            if c is None:
                return None
            assert c.candidate_mix is not None and c.served_mix is not None
            names = c.class_names
            agreed, rows = c.by_served.get(served, [0, 0])
            return ShadowReport(
                version=version,
                active=c.stopped is None,
                started=c.started,
                stopped=c.stopped,
                rows=rows,
                agreed=agreed,
                agreement=agreed / rows if rows else None,
                agreement_interval=wilson(Counts(agreed, rows)) if rows else None,
                served=served,
                by_served={
                    s: ServedAgreement(rows=n, agreed=a, agreement=a / n if n else None)
                    for s, (a, n) in c.by_served.items()
                },
                dropped_rows=c.dropped,
                failed_rows=c.failed,
                candidate_class_mix=dict(zip(names, c.candidate_mix.tolist(), strict=True)),
                served_class_mix=dict(zip(names, c.served_mix.tolist(), strict=True)),
                decision=c.decision,
            )

    def _save(self) -> None:
        if self._state is None:
            return
        with self._save_lock:  # the newest counts are the last written
            with self._lock:
                saved = [_saved(c) for c in self._candidates.values()]
            self._saved_at = time.monotonic()
            write_saved(self._state, saved)

    def _restore(self, saved: list[SavedCandidate]) -> None:
        for entry in saved:
            model = None
            stopped = entry.stopped
            if stopped is None:  # it was active: verify and load it again, as at its start
                try:
                    model = self._load(entry.version)
                except Exception as exc:
                    log.error("shadow: %s not resumed, stopped: %s", entry.version, exc)
                    stopped = time.time()
            self._candidates[entry.version] = _restored(entry, model, stopped)


def _saved(c: _Candidate) -> SavedCandidate:
    assert c.candidate_mix is not None and c.served_mix is not None
    return SavedCandidate(
        version=c.version,
        started=c.started,
        stopped=c.stopped,
        by_served={served: (agreed, rows) for served, (agreed, rows) in c.by_served.items()},
        dropped=c.dropped,
        failed=c.failed,
        class_names=c.class_names,
        candidate_mix=c.candidate_mix.tolist(),
        served_mix=c.served_mix.tolist(),
        decision=c.decision,
    )


def _restored(
    entry: SavedCandidate, model: LoadedModel | None, stopped: float | None
) -> _Candidate:
    classes = len(entry.class_names)

    def mix(counts: list[int]) -> np.ndarray:
        return np.asarray(counts if len(counts) == classes else [0] * classes, dtype=np.int64)

    return _Candidate(
        version=entry.version,
        class_names=entry.class_names,
        model=model,
        started=entry.started,
        stopped=stopped,
        by_served={served: [agreed, rows] for served, (agreed, rows) in entry.by_served.items()},
        dropped=entry.dropped,
        failed=entry.failed,
        candidate_mix=mix(entry.candidate_mix),
        served_mix=mix(entry.served_mix),
        decision=entry.decision,
    )
