"""The inference service: ``create_app(settings)`` builds the FastAPI app.

(No ``from __future__ import annotations`` here: FastAPI must see the local ``Depends``.)

Everything that can be wrong at startup (keys, registry, the served version, the audit
database) is checked inside ``create_app``, which raises ``ServingStartupError`` with one line.
See docs/serving.md for the endpoints, the roles, the limits and the decisions.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from fedaiot.errors import BadInputError
from fedaiot.monitoring.rules import RulesError, load_rules
from fedaiot.registry.signing import SigningError, load_public_key
from fedaiot.registry.store import ModelRegistry, RegistryError
from fedaiot.serving import reasons
from fedaiot.serving.alerting import AlertEngine
from fedaiot.serving.audit import AuditError, AuditLog, make_record
from fedaiot.serving.audit_query import AuditFilter
from fedaiot.serving.audit_sampling import RefusalSampler
from fedaiot.serving.auth import Principal, TokenVerifier
from fedaiot.serving.authenticate import Authenticate
from fedaiot.serving.body_limit import BodyLimit
from fedaiot.serving.guard import Guard
from fedaiot.serving.holder import ModelHolder
from fedaiot.serving.inference import Predictor, Refusal, body_limit
from fedaiot.serving.inputs import InputError
from fedaiot.serving.limits import AddressLimiter, DailyQuota, RateLimiter
from fedaiot.serving.metrics import ServiceMetrics
from fedaiot.serving.models import LoadedModel, ModelLoadError, Runtime
from fedaiot.serving.monitor import Monitor
from fedaiot.serving.observe import Observe, audit_fields
from fedaiot.serving.redact import redact_paths
from fedaiot.serving.revocation import RevocationError
from fedaiot.serving.routes_edge import add_edge_routes
from fedaiot.serving.routes_ops import add_ops_routes
from fedaiot.serving.schemas import (
    AUTH_ERRORS,
    VERSION_PATTERN,
    AuditEntries,
    Health,
    ModelCard,
    ModelList,
    PredictRequest,
    PredictResponse,
    PromoteRequest,
    SwapResult,
    model_card,
)
from fedaiot.serving.settings import ServingSettings
from fedaiot.serving.shadow import Shadow
from fedaiot.serving.shadow_state import SHADOW_FILE

log = logging.getLogger(__name__)
# The body is read by hand, after the token check, so FastAPI does not parse it: the schema is
# stated here for the OpenAPI document.
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


class ServingStartupError(BadInputError):
    """The service cannot start; the message is one line."""


def _load(settings: ServingSettings) -> tuple[ModelHolder, Ed25519PublicKey, TokenVerifier]:
    if not settings.registry.is_dir():
        raise ServingStartupError(f"model registry {settings.registry} not found")
    try:
        model_key = load_public_key(settings.model_key_path)
        verifier = TokenVerifier(settings)
    except (SigningError, RevocationError) as exc:
        raise ServingStartupError(str(exc)) from None
    runtime = Runtime(settings.runtime, settings.onnx_artifact, settings.torch_threads)
    holder = ModelHolder(
        ModelRegistry(settings.registry), model_key, settings.served_history, runtime
    )
    try:
        holder.start()
    except (RegistryError, OSError) as exc:
        raise ServingStartupError(f"cannot serve a model: {exc}") from None
    return holder, model_key, verifier


def _audit_log(settings: ServingSettings) -> tuple[AuditLog, dict[str, int]]:
    sampler = RefusalSampler(
        settings.audit_window_seconds,
        settings.audit_refused_per_key,
        settings.audit_refused_total,
        settings.audit_max_keys,
    )
    try:
        audit = AuditLog(settings.audit_path, sampler)
        return audit, audit.rows_today()
    except AuditError as exc:
        raise ServingStartupError(str(exc)) from None


def _engine(
    settings: ServingSettings,
    holder: ModelHolder,
    monitor: Monitor,
    shadow: Shadow,
    audit: AuditLog,
    metrics: ServiceMetrics,
    key: Ed25519PublicKey,
) -> AlertEngine | None:
    if settings.alert_rules is None:
        return None
    try:
        rules = load_rules(settings.alert_rules)
    except RulesError as exc:
        raise ServingStartupError(str(exc)) from None
    return AlertEngine(rules, holder, monitor, shadow, audit, metrics, key, metrics.registry)


def create_app(settings: ServingSettings) -> FastAPI:
    holder, model_key, verifier = _load(settings)
    audit, used_today = _audit_log(settings)
    limiter = RateLimiter(settings.rate_limits)
    addresses = AddressLimiter(settings.unauthenticated_limit)
    guard = Guard(verifier, limiter, addresses)
    metrics = ServiceMetrics(audit)
    metrics.served(holder.current.version)
    monitor = Monitor(
        metrics.registry, settings.monitor_slot_seconds, settings.monitor_horizon_seconds
    )
    monitor.track(holder.current)
    shadow = Shadow(holder.load, lambda: holder.current, settings.registry / SHADOW_FILE)

    def observed(model: LoadedModel, x: np.ndarray, labels: np.ndarray) -> None:
        monitor.predicted(model, x, labels)
        shadow.submit(x, model, labels)

    quota = DailyQuota(settings.rate_limits, used_today)
    predictor = Predictor(settings, limiter, quota, observed)
    engine = _engine(settings, holder, monitor, shadow, audit, metrics, model_key)

    def public(text: str) -> str:
        return redact_paths(text, [settings.registry])

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run()) if engine is not None else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            engine.close()  # type: ignore[union-attr]
        shadow.close()
        predictor.close()
        audit.close()

    app = FastAPI(
        title="fedaiot inference service",
        version="1",
        description="Predictions from the federated global model, role-gated and audited.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.add_middleware(
        BodyLimit,
        limit=lambda: body_limit(settings, holder.current),
        timeout=settings.body_timeout_seconds,
    )
    guarded_metrics = settings.metrics_auth == "admin"

    def protected(path: str) -> bool:
        return path.startswith("/v1/") or (guarded_metrics and path == "/metrics")

    app.add_middleware(Authenticate, guard=guard, protected=protected)
    # Outermost: sees every answer.
    app.add_middleware(
        Observe, audit=audit, metrics=metrics, routes=app.router.routes, monitor=monitor
    )
    app.state.holder, app.state.audit, app.state.metrics = holder, audit, metrics
    app.state.monitor, app.state.shadow, app.state.engine = monitor, shadow, engine
    app.state.address_blocked = addresses.spent  # read by the uvicorn protocol (protocol.py)

    def connection_refused(reason: str, address: str | None) -> None:
        """A connection turned away by the protocol: counted, and audited (sampled)."""
        metrics.connection_refused(reason)
        status = reasons.CONNECTION_STATUS[reason]
        audit.record(
            make_record(request_id=uuid.uuid4().hex, method="-", endpoint="(connection)",
                        status=status, duration_ms=0.0, client=address, reason=reason)
        )  # fmt: skip

    app.state.connection_refused = connection_refused

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Without "input": the caller's data is never echoed (and NaN would not encode).
        audit_fields(request, reason=reasons.BAD_INPUT)
        errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={**AUTH_ERRORS, 413: {"description": "body too large"}},
        openapi_extra=_PREDICT_BODY,
    )
    async def predict(
        request: Request,
        principal: Annotated[Principal, Depends(guard.require("predict"))],
    ) -> Response:
        """Batch prediction: the label of each instance (and probabilities for clinicians)."""
        model = holder.current  # this request uses this object to the end, whatever swaps
        audit_fields(request, model_version=model.version)
        monitor.track(model)  # so that its outcome is counted, even a refusal
        try:
            body = await request.body()  # size and time limited by BodyLimit
            result = await predictor.predict(body, model, principal)
        except ClientDisconnect:
            audit_fields(request, reason="client_disconnected")
            return Response(status_code=400)
        except InputError as exc:
            audit_fields(request, reason=exc.reason)
            detail = [{"loc": list(exc.loc), "msg": str(exc), "type": "value_error"}]
            raise HTTPException(422, detail) from None
        except Refusal as exc:
            audit_fields(request, reason=exc.reason)
            raise HTTPException(exc.status, exc.detail, exc.headers) from None
        audit_fields(request, rows=result.rows)
        metrics.rows(model.version, result.rows)
        return Response(result.body, media_type="application/json")

    @app.get("/v1/model", response_model=ModelCard, responses=AUTH_ERRORS)
    async def card(
        request: Request, _: Annotated[Principal, Depends(guard.require("model_card"))]
    ) -> ModelCard:
        """The served model's card: version, task, round, metrics, each node's privacy."""
        model = holder.current
        audit_fields(request, model_version=model.version)
        return model_card(model.manifest)

    @app.get("/v1/models", response_model=ModelList, responses=AUTH_ERRORS)
    def models(
        request: Request, _: Annotated[Principal, Depends(guard.require("models"))]
    ) -> ModelList:
        """Every registered version, whether its signature holds, and (if it does) its round
        and accuracy; which one is served."""
        served = holder.current.version
        audit_fields(request, model_version=served)
        return ModelList.build(holder.registry, model_key, served, holder.history())

    async def swap(
        request: Request, action: str, run: Callable[[], tuple[str, str]], why: str = ""
    ) -> SwapResult:
        try:
            previous, now = await run_in_threadpool(run)
        except LookupError as exc:
            metrics.swap(action, "refused")
            audit_fields(request, reason=reasons.REFUSED, note=f"{action} refused: {exc}")
            raise HTTPException(409, str(exc)) from None
        except ModelLoadError as exc:
            metrics.swap(action, "refused")
            text = public(str(exc))
            audit_fields(request, reason=reasons.REFUSED, note=f"{action} refused: {text}")
            raise HTTPException(
                409, f"{action} refused, still serving {holder.current.version}: {text}"
            ) from None
        except (RegistryError, OSError) as exc:  # refs.json / served.json not writable
            metrics.swap(action, "failed")
            log.error("%s failed: %s", action, exc)
            note = f"{action} failed: {public(str(exc))}"
            audit_fields(request, reason=reasons.FAILED, note=note)
            raise HTTPException(
                503, f"{action} failed, still serving {holder.current.version}: the registry "
                "could not be updated (see the server's log)"
            ) from None  # fmt: skip
        metrics.swap(action, "done")
        metrics.served(holder.current.version)
        audit_fields(request, model_version=now, note=f"{action}: {previous} -> {now}{why}")
        return SwapResult(served=now, previous=previous)

    @app.post(
        "/v1/models/{version}/promote",
        response_model=SwapResult,
        responses={
            **AUTH_ERRORS,
            404: {"description": "no such version"},
            409: {"description": "the version is unsigned, tampered or corrupt"},
        },
    )
    async def promote(
        request: Request,
        version: Annotated[str, Path(pattern=VERSION_PATTERN)],
        _: Annotated[Principal, Depends(guard.require("manage"))],
        change: Annotated[PromoteRequest | None, Body()] = None,
    ) -> SwapResult:
        """Verify a version fully, then serve it (admin), with an optional reason for the audit
        log. In-flight requests are unaffected."""
        if version not in holder.registry.versions():
            raise HTTPException(404, "no such model version in the registry")
        why = f"; reason: {change.reason}" if change is not None and change.reason else ""
        audit_fields(request, model_version=version, note=f"promote requested{why}")
        return await swap(request, "promote", lambda: holder.promote(version), why)

    @app.post(
        "/v1/models/rollback",
        response_model=SwapResult,
        responses={**AUTH_ERRORS, 409: {"description": "nothing to roll back to, or refused"}},
    )
    async def rollback(
        request: Request, _: Annotated[Principal, Depends(guard.require("manage"))]
    ) -> SwapResult:
        """Serve again the version served before the current one (admin)."""
        audit_fields(request, model_version=holder.current.version)
        return await swap(request, "rollback", holder.rollback)

    @app.get("/v1/audit", response_model=AuditEntries, responses=AUTH_ERRORS)
    def audit_log(
        _: Annotated[Principal, Depends(guard.require("audit"))],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        subject: Annotated[str | None, Query(max_length=200)] = None,
        status: Annotated[int | None, Query(ge=100, le=599)] = None,
        reason: Annotated[str | None, Query(max_length=64)] = None,
    ) -> AuditEntries:
        """The newest audit rows, newest first (admin, auditor)."""
        where = AuditFilter(subject=subject, status=status, reason=reason, limit=limit)
        try:
            return AuditEntries.model_validate({"entries": audit.query(where)})
        except AuditError as exc:
            log.error("audit query failed: %s", exc)
            raise HTTPException(503, "the audit database cannot be read now") from None

    add_edge_routes(app, guard, holder, model_key)
    add_ops_routes(app, guard, holder, monitor, shadow, engine)

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
