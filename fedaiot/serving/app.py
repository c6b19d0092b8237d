"""The inference service: ``create_app(settings)`` builds the FastAPI app.

(No ``from __future__ import annotations`` here: FastAPI must see the local ``Depends``.)

Everything that can be wrong at startup (keys, registry, the served version, the audit
database) is checked inside ``create_app``, which raises ``ServingStartupError`` with one line.
See docs/serving.md for the endpoints, the roles and the decisions.
"""

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedaiot.registry import ModelRegistry, RegistryError
from fedaiot.serving.audit import AuditError, AuditLog, make_record
from fedaiot.serving.auth import AUDIT_SCOPE_KEY, Guard, Principal, RateLimiter, TokenVerifier
from fedaiot.serving.metrics import ServiceMetrics
from fedaiot.serving.models import InputError, ModelHolder, ModelLoadError, parse_instances
from fedaiot.serving.schemas import (
    AuditEntries,
    Health,
    ModelCard,
    ModelList,
    PredictRequest,
    PredictResponse,
    SwapResult,
    model_card,
)
from fedaiot.serving.settings import ServingSettings
from fedaiot.signing import SigningError, load_public_key

_INLINE_VALUES = 16_384  # batches up to this many values run on the event loop (no thread hop)
_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no token, or an expired / badly signed one (reason in detail)"},
    403: {"description": "the token's role may not call this endpoint"},
    429: {"description": "the role's rate limit is exceeded (see Retry-After)"},
}


class ServingStartupError(RuntimeError):
    """The service cannot start; the message is one line."""


class _Observe:
    """Pure ASGI middleware: body size limit, Prometheus metrics, and one audit row per call."""

    def __init__(
        self, app: ASGIApp, audit: AuditLog, metrics: ServiceMetrics, max_body: int
    ) -> None:
        self.app, self.audit, self.metrics, self.max_body = app, audit, metrics, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        fields: dict[str, Any] = {}
        scope[AUDIT_SCOPE_KEY] = fields
        status = 500
        seen = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, f"request body over {self.max_body} bytes")
            return message

        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.observe(method, endpoint, status, seconds)
            if scope["path"].startswith("/v1/"):
                self.audit.record(
                    make_record(
                        request_id=uuid.uuid4().hex,
                        method=method,
                        endpoint=endpoint,
                        status=status,
                        duration_ms=seconds * 1000.0,
                        **fields,
                    )
                )


def _load(settings: ServingSettings) -> tuple[ModelHolder, TokenVerifier, AuditLog]:
    if not settings.registry.is_dir():
        raise ServingStartupError(f"model registry {settings.registry} not found")
    try:
        model_key = load_public_key(settings.model_key_path)
        verifier = TokenVerifier(settings)
    except SigningError as exc:
        raise ServingStartupError(str(exc)) from None
    holder = ModelHolder(ModelRegistry(settings.registry), model_key, settings.served_history)
    try:
        holder.start()
    except (RegistryError, OSError) as exc:
        raise ServingStartupError(f"cannot serve a model: {exc}") from None
    try:
        audit = AuditLog(settings.audit_path)
    except AuditError as exc:
        raise ServingStartupError(str(exc)) from None
    return holder, verifier, audit


def create_app(settings: ServingSettings) -> FastAPI:
    holder, verifier, audit = _load(settings)
    guard = Guard(verifier, RateLimiter(settings.rate_limits))
    metrics = ServiceMetrics(audit)
    metrics.served(holder.current.version)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        audit.close()

    app = FastAPI(
        title="fedaiot inference service",
        version="1",
        description="Predictions from the federated global model, role-gated and audited.",
        lifespan=lifespan,
    )
    app.add_middleware(_Observe, audit=audit, metrics=metrics, max_body=settings.max_body_bytes)
    app.state.holder, app.state.audit, app.state.metrics = holder, audit, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Without "input": the caller's data is never echoed (and NaN would not encode).
        errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def audit_fields(request: Request, **values: Any) -> None:
        request.scope.setdefault(AUDIT_SCOPE_KEY, {}).update(values)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_AUTH_ERRORS)
    async def predict(
        body: PredictRequest,
        request: Request,
        principal: Annotated[Principal, Depends(guard.require("predict"))],
    ) -> Response:
        """Batch prediction: the label of each instance (and probabilities for clinicians)."""
        model = holder.current  # this request uses this object to the end, whatever swaps
        audit_fields(request, model_version=model.version)
        try:
            x = parse_instances(body.instances, model, settings.max_batch)
        except InputError as exc:
            detail = [{"loc": list(exc.loc), "msg": str(exc), "type": "value_error"}]
            raise HTTPException(422, detail) from None
        if x.size <= _INLINE_VALUES:
            probs = model.predict_proba(x)
        else:
            probs = await run_in_threadpool(model.predict_proba, x)
        audit_fields(request, rows=len(x))
        metrics.rows(model.version, len(x))
        names = model.class_names
        best = probs.argmax(axis=1).tolist()
        if principal.can("probabilities"):
            rows = probs.tolist()
            predictions: list[dict[str, Any]] = [
                {
                    "label": names[k],
                    "class_index": k,
                    "probabilities": dict(zip(names, p, strict=True)),
                }
                for k, p in zip(best, rows, strict=True)
            ]
        else:
            predictions = [{"label": names[k], "class_index": k} for k in best]
        return JSONResponse({"model_version": model.version, "predictions": predictions})

    @app.get("/v1/model", response_model=ModelCard, responses=_AUTH_ERRORS)
    async def card(
        request: Request, _: Annotated[Principal, Depends(guard.require("model_card"))]
    ) -> ModelCard:
        """The served model's card: version, task, round, metrics, each node's privacy."""
        model = holder.current
        audit_fields(request, model_version=model.version)
        return model_card(model.manifest)

    @app.get("/v1/models", response_model=ModelList, responses=_AUTH_ERRORS)
    def models(
        request: Request, _: Annotated[Principal, Depends(guard.require("models"))]
    ) -> ModelList:
        """Every registered version with its round and accuracy, and which one is served."""
        served = holder.current.version
        audit_fields(request, model_version=served)
        return ModelList.build(holder.registry, served, holder.history())

    async def swap(request: Request, action: str, run: Callable[[], tuple[str, str]]) -> SwapResult:
        try:
            previous, now = await run_in_threadpool(run)
        except LookupError as exc:
            metrics.swap(action, "refused")
            audit_fields(request, note=f"{action} refused: {exc}")
            raise HTTPException(409, str(exc)) from None
        except ModelLoadError as exc:
            metrics.swap(action, "refused")
            audit_fields(request, note=f"{action} refused: {exc}")
            raise HTTPException(
                409, f"{action} refused, still serving {holder.current.version}: {exc}"
            ) from None
        except (RegistryError, OSError) as exc:  # refs.json / served.json not writable
            metrics.swap(action, "failed")
            audit_fields(request, note=f"{action} failed: {exc}")
            raise HTTPException(
                503, f"{action} failed, still serving {holder.current.version}: {exc}"
            ) from None
        metrics.swap(action, "done")
        metrics.served(holder.current.version)
        audit_fields(request, model_version=now, note=f"{action}: {previous} -> {now}")
        return SwapResult(served=now, previous=previous)

    @app.post(
        "/v1/models/{version}/promote",
        response_model=SwapResult,
        responses={
            **_AUTH_ERRORS,
            404: {"description": "no such version"},
            409: {"description": "the version is unsigned, tampered or corrupt"},
        },
    )
    async def promote(
        request: Request,
        version: Annotated[str, Path(pattern=_VERSION)],
        _: Annotated[Principal, Depends(guard.require("manage"))],
    ) -> SwapResult:
        """Verify a version fully, then serve it (admin). In-flight requests are unaffected."""
        audit_fields(request, model_version=version)
        if version not in holder.registry.versions():
            raise HTTPException(404, f"model version {version} not found")
        return await swap(request, "promote", lambda: holder.promote(version))

    @app.post(
        "/v1/models/rollback",
        response_model=SwapResult,
        responses={**_AUTH_ERRORS, 409: {"description": "nothing to roll back to, or refused"}},
    )
    async def rollback(
        request: Request, _: Annotated[Principal, Depends(guard.require("manage"))]
    ) -> SwapResult:
        """Serve again the version served before the current one (admin)."""
        audit_fields(request, model_version=holder.current.version)
        return await swap(request, "rollback", holder.rollback)

    @app.get("/v1/audit", response_model=AuditEntries, responses=_AUTH_ERRORS)
    def audit_log(
        _: Annotated[Principal, Depends(guard.require("audit"))],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        subject: Annotated[str | None, Query(max_length=200)] = None,
    ) -> AuditEntries:
        """The newest audit rows, newest first (admin, auditor)."""
        try:
            return AuditEntries(entries=audit.query(limit, subject))
        except AuditError as exc:
            raise HTTPException(503, str(exc)) from None

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness and the served version; no authentication."""
        return Health(status="ok", model_version=holder.current.version)

    metrics_guard: list[Any] = []
    if settings.metrics_auth == "admin":
        metrics_guard = [Depends(guard.require("metrics"))]

    @app.get("/metrics", dependencies=metrics_guard, response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text: request counts and latency per endpoint and status."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
