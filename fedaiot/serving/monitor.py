"""Per model version, from counts only: predict calls by outcome, latency, rows, the predicted
class mix, and input drift per feature against the training distribution.

Outcomes of ``POST /v1/predict`` calls that reached a model (after the token and rate checks):
``ok``, ``refused`` (4xx: bad input, out of range, a row limit or quota) and ``error`` (5xx).
Inputs are reduced to counts per feature and drift bin (``fedaiot.tasks.histogram``) in the
inference thread, and the batch is dropped: no value is kept. Counts are kept in time slots
(``SlotCounts``), so rules and gauges read any recent window; totals feed the Prometheus
counters. At most ``MAX_VERSIONS`` versions are tracked (the oldest is forgotten).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, Field

from fedaiot.monitoring.drift import psi
from fedaiot.monitoring.window import SlotCounts
from fedaiot.serving.models import LoadedModel

OUTCOMES = ("ok", "refused", "error")
_ROWS = len(OUTCOMES)  # the rows' index in the outcome counts
MAX_VERSIONS = 32
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def outcome(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "error"


@dataclass(slots=True)
class VersionStats:
    version: str
    classes: list[str]
    features: list[str] | None  # drift's features (channels of an image or a series)
    reference: np.ndarray | None
    outcomes: SlotCounts  # ok, refused, error, rows
    latency: SlotCounts  # answered calls per latency bucket (the histogram's, and one beyond)
    predicted: SlotCounts  # per class
    drift: SlotCounts | None  # per feature and bin


class Snapshot(BaseModel):
    version: str
    window_seconds: float
    requests: int
    ok: int
    refused: int
    errors: int
    rows: int
    error_rate: float | None
    refusal_rate: float | None
    latency_ms: dict[str, float | None] = Field(
        default_factory=dict,
        description="p50 and p99 of answered calls: the upper edge of the histogram bucket "
        "holding each (None beyond the last, 5 s)",
    )
    class_mix: dict[str, int]
    psi: dict[str, float] | None = Field(
        default=None, description="per feature, over the window; none without normalization"
    )
    psi_max: float | None = None
    psi_max_feature: str | None = None


def _features(model: LoadedModel) -> list[str] | None:
    if model.reference is None:
        return None
    count = model.shape[0]
    if model.feature_names is not None and len(model.feature_names) == count:
        return list(model.feature_names)
    return [f"channel {i}" for i in range(count)]


class Monitor:
    def __init__(
        self,
        registry: CollectorRegistry,
        slot_seconds: float = 10.0,
        horizon_seconds: float = 3600.0,
        gauge_window_seconds: float = 900.0,
    ) -> None:
        self._slot, self._horizon = slot_seconds, horizon_seconds
        self.gauge_window = min(gauge_window_seconds, horizon_seconds)
        self._stats: OrderedDict[str, VersionStats] = OrderedDict()
        self._lock = threading.Lock()
        self._latency = Histogram(
            "fedaiot_model_request_duration_seconds",
            "Predict calls that reached a model: time to answer, by model version",
            ["model_version"],
            buckets=_BUCKETS,
            registry=registry,
        )
        registry.register(_Collector(self))

    def _counts(self, shape: tuple[int, ...]) -> SlotCounts:
        return SlotCounts(shape, self._slot, self._horizon)

    def track(self, model: LoadedModel) -> VersionStats:
        """The statistics of ``model``'s version (created on first sight)."""
        with self._lock:
            stats = self._stats.get(model.version)
            if stats is None:
                features = _features(model)
                reference = model.reference if features is not None else None
                stats = VersionStats(
                    version=model.version,
                    classes=list(model.class_names),
                    features=features,
                    reference=reference,
                    outcomes=self._counts((_ROWS + 1,)),
                    latency=self._counts((len(_BUCKETS) + 1,)),
                    predicted=self._counts((len(model.class_names),)),
                    drift=self._counts(reference.shape) if reference is not None else None,
                )
                self._stats[model.version] = stats
                while len(self._stats) > MAX_VERSIONS:
                    self._stats.popitem(last=False)
            return stats

    def stats(self, version: str) -> VersionStats | None:
        with self._lock:
            return self._stats.get(version)

    def versions(self) -> list[str]:
        with self._lock:
            return list(self._stats)

    def request(self, version: str, status: int, seconds: float) -> None:
        """A predict call's outcome (the Observe middleware, once it is answered)."""
        stats = self.stats(version)
        if stats is None:
            return
        counts = np.zeros(_ROWS + 1, dtype=np.int64)
        counts[OUTCOMES.index(outcome(status))] = 1
        stats.outcomes.add(counts)
        if status < 400:
            self._latency.labels(version).observe(seconds)
            bucket = np.zeros(len(_BUCKETS) + 1, dtype=np.int64)
            bucket[bisect.bisect_left(_BUCKETS, seconds)] = 1
            stats.latency.add(bucket)

    def predicted(self, model: LoadedModel, x: np.ndarray, labels: np.ndarray) -> None:
        """A predicted batch, reduced to counts (the inference thread)."""
        stats = self.track(model)
        rows = np.zeros(_ROWS + 1, dtype=np.int64)
        rows[_ROWS] = len(labels)
        stats.outcomes.add(rows)
        stats.predicted.add(np.bincount(labels, minlength=len(stats.classes)))
        if stats.drift is not None:
            counts = model.drift_counts(x)
            if counts is not None:
                stats.drift.add(counts)

    def drift(self, stats: VersionStats, seconds: float) -> tuple[np.ndarray, int] | None:
        """PSI per feature over the last ``seconds``, and the rows it is over."""
        if stats.drift is None or stats.reference is None:
            return None
        rows = int(stats.outcomes.window(seconds)[_ROWS])
        if rows == 0:
            return None
        return psi(stats.drift.window(seconds), stats.reference), rows

    def snapshot(self, version: str, seconds: float) -> Snapshot | None:
        stats = self.stats(version)
        if stats is None:
            return None
        ok, refused, errors, rows = (int(v) for v in stats.outcomes.window(seconds))
        requests = ok + refused + errors
        mix = stats.predicted.window(seconds)
        found = self.drift(stats, seconds)
        values = None
        if found is not None and stats.features is not None:
            values = {f: round(float(v), 6) for f, v in zip(stats.features, found[0], strict=True)}
        worst = max(values, key=values.__getitem__) if values else None
        return Snapshot(
            version=version,
            window_seconds=seconds,
            requests=requests,
            ok=ok,
            refused=refused,
            errors=errors,
            rows=rows,
            error_rate=errors / requests if requests else None,
            refusal_rate=refused / requests if requests else None,
            latency_ms=_quantiles(stats.latency.window(seconds)),
            class_mix={c: int(n) for c, n in zip(stats.classes, mix, strict=True)},
            psi=values,
            psi_max=values[worst] if values and worst else None,
            psi_max_feature=worst,
        )


def _quantiles(counts: np.ndarray) -> dict[str, float | None]:
    """p50 and p99 from bucket counts: each bucket's upper edge, in milliseconds."""
    total = int(counts.sum())
    if total == 0:
        return {"p50": None, "p99": None}
    cumulative = np.cumsum(counts)
    found: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        index = int(np.searchsorted(cumulative, q * total))
        found[name] = _BUCKETS[index] * 1000 if index < len(_BUCKETS) else None
    return found


class _Collector:
    """Prometheus families computed at scrape time from the monitor's counts."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return []  # families depend on the versions seen: collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fedaiot_model_requests",
            "Predict calls that reached a model, by version and outcome (ok, refused, error)",
            labels=["model_version", "outcome"],
        )
        classes = CounterMetricFamily(
            "fedaiot_model_predicted_class",
            "Rows predicted per class, by model version",
            labels=["model_version", "class"],
        )
        window = self.monitor.gauge_window
        drift = GaugeMetricFamily(
            "fedaiot_input_drift_psi",
            f"Population stability index of each input feature over the last {window:g} s, "
            "against the training distribution",
            labels=["model_version", "feature"],
        )
        drift_max = GaugeMetricFamily(
            "fedaiot_input_drift_psi_max",
            f"The largest feature PSI over the last {window:g} s",
            labels=["model_version"],
        )
        drift_rows = GaugeMetricFamily(
            "fedaiot_input_drift_rows",
            f"Rows the drift gauges are computed from (the last {window:g} s)",
            labels=["model_version"],
        )
        for version in self.monitor.versions():
            stats = self.monitor.stats(version)
            if stats is None:
                continue
            totals = stats.outcomes.total()
            for index, name in enumerate(OUTCOMES):
                requests.add_metric([version, name], float(totals[index]))
            for name, count in zip(stats.classes, stats.predicted.total(), strict=True):
                classes.add_metric([version, name], float(count))
            found = self.monitor.drift(stats, window)
            if found is not None and stats.features is not None:
                values, rows = found
                for feature, value in zip(stats.features, values, strict=True):
                    drift.add_metric([version, feature], float(value))
                drift_max.add_metric([version], float(values.max()))
                drift_rows.add_metric([version], float(rows))
        yield from (requests, classes, drift, drift_max, drift_rows)
