"""Pure ASGI middleware: Prometheus metrics for every call, one audit row per ``/v1/*`` call.

Handlers and the guard add the row's fields (who, reason, rows, ...) to a dict in the request's
scope with ``audit_fields``; this middleware adds when, where from, the route, the status and
the duration, and hands the row to the audit log once the response is sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedaiot.serving import reasons
from fedaiot.serving.audit import AuditLog, make_record
from fedaiot.serving.metrics import ServiceMetrics
from fedaiot.serving.monitor import Monitor

AUDIT_SCOPE_KEY = "fedaiot.audit"
PREDICT = "/v1/predict"


def audit_fields(where: HTTPConnection | Scope, **values: Any) -> None:
    """Add fields to the audit row of the request ``where`` belongs to."""
    scope = where.scope if isinstance(where, HTTPConnection) else where
    scope.setdefault(AUDIT_SCOPE_KEY, {}).update(values)


def client_address(where: HTTPConnection | Scope) -> str:
    scope = where.scope if isinstance(where, HTTPConnection) else where
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template a request is for (``/v1/models/{version}/promote``), also when it was
    answered before routing (a refused token): never the caller's own path text."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"


class Observe:
    def __init__(
        self,
        app: ASGIApp,
        audit: AuditLog,
        metrics: ServiceMetrics,
        routes: Sequence[BaseRoute],
        monitor: Monitor | None = None,
    ) -> None:
        self.app, self.audit, self.metrics, self.routes = app, audit, metrics, routes
        self.monitor = monitor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        fields: dict[str, Any] = {}
        scope[AUDIT_SCOPE_KEY] = fields
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - started
            endpoint = route_template(scope, self.routes)
            method = scope["method"]
            self.metrics.observe(method, endpoint, status, seconds)
            version = fields.get("model_version")
            if self.monitor is not None and endpoint == PREDICT and version:
                self.monitor.request(version, status, seconds)  # reached a model: its outcome
            if scope["path"].startswith("/v1/"):
                reason = fields.pop("reason", None) or reasons.for_status(status)
                self.audit.record(
                    make_record(
                        request_id=uuid.uuid4().hex,
                        method=method,
                        endpoint=endpoint,
                        status=status,
                        duration_ms=seconds * 1000.0,
                        client=client_address(scope),
                        reason=reason,
                        **fields,
                    )
                )
