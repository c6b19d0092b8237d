"""Rate limits and quotas, in memory, per process: token buckets and a daily row quota.

* requests per (role, subject), and predicted rows per (role, subject): each a token bucket;
* rows per subject and UTC day: a quota, seeded at startup from the audit log's rows of the
  day, so a restart does not hand out a fresh quota;
* calls without a valid token, per client address: a token bucket.

Everything is thread-safe (predictions are admitted from the inference threads) and bounded in
size: a bucket that has refilled is the same as a new one and is forgotten first.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

from fedaiot.serving.settings import DAY, RateLimit


class Buckets:
    """Token buckets under one lock, keyed by anything hashable, at most ``max_keys`` of them."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._state: dict[Hashable, tuple[float, float, float, int]] = {}
        self._lock = threading.Lock()
        self._max_keys = max_keys

    def take(
        self, key: Hashable, cost: float, rate: float, burst: int, now: float | None = None
    ) -> float:
        """Spend ``cost``: 0.0 when allowed, else the seconds until it would be (inf when
        ``cost`` exceeds ``burst``: it never will be)."""
        if cost > burst:
            return math.inf
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last, _, _ = self._state.get(key, (float(burst), now, rate, burst))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens < cost:
                self._state[key] = (tokens, now, rate, burst)
                return (cost - tokens) / rate
            self._state[key] = (tokens - cost, now, rate, burst)
            if len(self._state) > self._max_keys:
                self._shrink(now)
        return 0.0

    def peek(self, key: Hashable, rate: float, burst: int, now: float | None = None) -> float:
        """The tokens ``key`` has now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last, _, _ = self._state.get(key, (float(burst), now, rate, burst))
        return min(float(burst), tokens + (now - last) * rate)

    def _shrink(self, now: float) -> None:
        for key, (tokens, last, rate, burst) in list(self._state.items()):
            if tokens + (now - last) * rate >= burst:
                del self._state[key]
        # Still full (a flood of distinct keys): drop the oldest half, in insertion order.
        if len(self._state) > self._max_keys:
            for key in list(self._state)[: len(self._state) // 2]:
                del self._state[key]


class RateLimiter:
    """Requests and predicted rows per (role, subject), by the role's ``RateLimit``."""

    def __init__(self, limits: dict[str, RateLimit]) -> None:
        self._limits = limits
        self.roles = frozenset(limits)
        self._requests = Buckets()
        self._rows = Buckets()

    def limit(self, role: str) -> RateLimit:
        return self._limits[role]

    def request(self, role: str, subject: str, now: float | None = None) -> float:
        limit = self._limits[role]
        return self._requests.take((role, subject), 1, limit.per_second, limit.burst, now)

    def rows(self, role: str, subject: str, count: int, now: float | None = None) -> float:
        limit = self._limits[role]
        return self._rows.take((role, subject), count, limit.rows_per_second, limit.rows_burst, now)


@dataclass(frozen=True, slots=True)
class QuotaCheck:
    allowed: bool
    left: int  # rows the subject may still predict today (after this batch, when allowed)


class DailyQuota:
    """Rows predicted per subject and UTC day, against the role's ``rows_per_day``."""

    def __init__(
        self, limits: dict[str, RateLimit], used_today: dict[str, int] | None = None
    ) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._day = self._today(None)
        self._used: dict[str, int] = dict(used_today or {})

    @staticmethod
    def _today(now: float | None) -> int:
        return int((time.time() if now is None else now) // DAY)

    def spend(self, role: str, subject: str, count: int, now: float | None = None) -> QuotaCheck:
        """Count ``count`` rows against the subject's quota, unless they do not fit."""
        quota = self._limits[role].rows_per_day
        day = self._today(now)
        with self._lock:
            if day != self._day:
                self._day, self._used = day, {}
            used = self._used.get(subject, 0)
            if used + count > quota:
                return QuotaCheck(False, max(0, quota - used))
            self._used[subject] = used + count
            return QuotaCheck(True, quota - used - count)


class AddressLimiter:
    """Calls without a valid token, per client address."""

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._buckets = Buckets()

    def take(self, address: str, now: float | None = None) -> float:
        return self._buckets.take(address, 1, self._limit.per_second, self._limit.burst, now)

    def spent(self, address: str, now: float | None = None) -> bool:
        """Whether ``address`` has no call left now (nothing is spent by asking)."""
        return self._buckets.peek(address, self._limit.per_second, self._limit.burst, now) < 1
