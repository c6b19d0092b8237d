"""Counts added over time, kept in fixed time slots, summed over any recent window.

A slot is ``slot_seconds`` wide; slots older than ``horizon_seconds`` are dropped, so memory is
bounded by ``horizon / slot`` arrays of the counts' shape (and only slots that saw traffic
exist). The total since the start is kept apart. Thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np


class SlotCounts:
    def __init__(
        self,
        shape: tuple[int, ...],
        slot_seconds: float,
        horizon_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slot_seconds <= 0 or horizon_seconds < slot_seconds:
            raise ValueError("need 0 < slot_seconds <= horizon_seconds")
        self.shape = shape
        self._slot = slot_seconds
        self._keep = math.ceil(horizon_seconds / slot_seconds)
        self._clock = clock
        self._slots: deque[tuple[int, np.ndarray]] = deque()
        self._total = np.zeros(shape, dtype=np.int64)
        self._lock = threading.Lock()

    def _index(self, now: float | None) -> int:
        return int((self._clock() if now is None else now) // self._slot)

    def add(self, counts: np.ndarray, now: float | None = None) -> None:
        index = self._index(now)
        with self._lock:
            if self._slots and self._slots[-1][0] == index:
                slot = self._slots[-1][1]
                slot += counts  # in place: the array in the deque
            else:
                self._slots.append((index, np.array(counts, dtype=np.int64).reshape(self.shape)))
            while self._slots and self._slots[0][0] <= index - self._keep:
                self._slots.popleft()
            self._total += counts

    def window(self, seconds: float, now: float | None = None) -> np.ndarray:
        """The counts of the last ``seconds`` (whole slots, the current one included)."""
        first = self._index(now) - max(1, math.ceil(seconds / self._slot)) + 1
        with self._lock:
            found = [counts for index, counts in self._slots if index >= first]
            return np.sum(found, axis=0) if found else np.zeros(self.shape, dtype=np.int64)

    def total(self) -> np.ndarray:
        with self._lock:
            return self._total.copy()
