"""Operations endpoints: alerts (auditor, admin), per-version monitoring (auditor, admin), and
shadow scoring of candidate versions (admin starts and stops it; auditor and admin read it).
"""

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from fedaiot.serving import reasons
from fedaiot.serving.alerting import AlertEngine, AlertFeed
from fedaiot.serving.auth import Principal
from fedaiot.serving.guard import Guard
from fedaiot.serving.holder import ModelHolder
from fedaiot.serving.models import ModelLoadError
from fedaiot.serving.monitor import Monitor, Snapshot
from fedaiot.serving.observe import audit_fields
from fedaiot.serving.redact import redact_paths
from fedaiot.serving.schemas import AUTH_ERRORS, VERSION_PATTERN
from fedaiot.serving.shadow import Shadow, ShadowError, ShadowReport


class Monitoring(BaseModel):
    served: str
    versions: list[Snapshot]


def add_ops_routes(
    app: FastAPI,
    guard: Guard,
    holder: ModelHolder,
    monitor: Monitor,
    shadow: Shadow,
    engine: AlertEngine | None,
) -> None:
    """Add the routes to ``app`` itself (see ``routes_edge``)."""
    version_path = Annotated[str, Path(pattern=VERSION_PATTERN)]
    missing = {**AUTH_ERRORS, 404: {"description": "no such version, or never shadowed"}}

    @app.get("/v1/alerts", response_model=AlertFeed, responses=AUTH_ERRORS)
    async def alerts(
        _: Annotated[Principal, Depends(guard.require("alerts"))],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AlertFeed:
        """The rules, what fires now, and the newest alert events (auditor, admin)."""
        if engine is None:
            return AlertFeed(rules=[], firing=[], events=[])
        return engine.feed(limit)

    @app.get("/v1/monitoring", response_model=Monitoring, responses=AUTH_ERRORS)
    async def monitoring(
        _: Annotated[Principal, Depends(guard.require("models"))],
        window_seconds: Annotated[float, Query(gt=0, le=7 * 86400)] = 900.0,
    ) -> Monitoring:
        """Per model version over the window: calls, rows, error and refusal rates, class
        mix, input drift per feature (auditor, admin). Counts only, never inputs."""
        snaps = [monitor.snapshot(v, window_seconds) for v in monitor.versions()]
        return Monitoring(served=holder.current.version, versions=[s for s in snaps if s])

    @app.get("/v1/models/{version}/shadow", response_model=ShadowReport, responses=missing)
    async def shadow_report(
        request: Request,
        version: version_path,
        _: Annotated[Principal, Depends(guard.require("models"))],
    ) -> ShadowReport:
        """How a shadowed candidate agrees with the served version (auditor, admin)."""
        audit_fields(request, model_version=version)
        report = shadow.report(version)
        if report is None:
            raise HTTPException(404, "this version has not been shadowed")
        return report

    @app.post(
        "/v1/models/{version}/shadow",
        response_model=ShadowReport,
        responses={**missing, 409: {"description": "refused: unverifiable, served, or full"}},
    )
    async def shadow_start(
        request: Request,
        version: version_path,
        _: Annotated[Principal, Depends(guard.require("manage"))],
    ) -> ShadowReport:
        """Verify a candidate and score live traffic with it too (admin); callers still get
        the served version's answers."""
        if version not in holder.registry.versions():
            raise HTTPException(404, "no such model version in the registry")
        audit_fields(request, model_version=version)
        try:
            report = await run_in_threadpool(shadow.start, version)
        except (ShadowError, ModelLoadError) as exc:
            text = redact_paths(str(exc), [holder.registry.root])
            audit_fields(request, reason=reasons.REFUSED, note=f"shadow refused: {text}")
            raise HTTPException(409, f"shadow refused: {text}") from None
        audit_fields(request, note=f"shadow started: {version} against {report.served}")
        return report

    @app.delete("/v1/models/{version}/shadow", response_model=ShadowReport, responses=missing)
    async def shadow_stop(
        request: Request,
        version: version_path,
        _: Annotated[Principal, Depends(guard.require("manage"))],
    ) -> ShadowReport:
        """Stop shadowing a candidate; its counts stay readable (admin)."""
        audit_fields(request, model_version=version)
        report = shadow.stop(version)
        if report is None:
            raise HTTPException(404, "this version has not been shadowed")
        audit_fields(request, note=f"shadow stopped: {version}, agreement {report.agreement}")
        return report
