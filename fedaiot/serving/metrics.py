"""Prometheus metrics of the inference service, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedaiot.serving.audit import AuditLog

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    def __init__(self, audit: AuditLog) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "fedaiot_requests",
            "HTTP requests by endpoint (route template) and status code",
            ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "fedaiot_request_duration_seconds",
            "Time from request to response, by endpoint and status code",
            ["method", "endpoint", "status"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._rows = Counter(
            "fedaiot_predicted_rows",
            "Instances predicted, by model version",
            ["model_version"],
            registry=self.registry,
        )
        self._swaps = Counter(
            "fedaiot_model_swaps",
            "Promotions and rollbacks, done or refused",
            ["action", "outcome"],
            registry=self.registry,
        )
        self._served = Gauge(
            "fedaiot_served_model_info",
            "1 for the model version being served",
            ["model_version"],
            registry=self.registry,
        )
        self._refused_connections = Counter(
            "fedaiot_connections_refused",
            "Connections closed before a request reached the app, by reason",
            ["reason"],
            registry=self.registry,
        )
        audit_failures = Gauge(
            "fedaiot_audit_write_failures",
            "Audit rows that could not be written",
            registry=self.registry,
        )
        audit_failures.set_function(lambda: float(audit.failures))

    def observe(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        code = str(status)
        self._requests.labels(method, endpoint, code).inc()
        self._latency.labels(method, endpoint, code).observe(seconds)

    def connection_refused(self, reason: str) -> None:
        self._refused_connections.labels(reason).inc()

    def rows(self, version: str, count: int) -> None:
        self._rows.labels(version).inc(count)

    def swap(self, action: str, outcome: str) -> None:
        self._swaps.labels(action, outcome).inc()

    def served(self, version: str) -> None:
        self._served.clear()
        self._served.labels(version).set(1)
