"""Pure ASGI middleware: the caller is admitted (token, rate limits) before anything else runs.

On the protected paths (``/v1/*``, and ``/metrics`` when it needs a token), ``Guard.admit``
checks the request's headers; a refusal is answered here, without routing, without FastAPI's
dependency machinery and without reading the body. That keeps a refused call cheap: a flood of
them costs the event loop little. The admitted ``Principal`` goes into the scope, where the
routes' role checks (``Guard.require``) find it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fedaiot.serving.body_limit import close_if_unread
from fedaiot.serving.guard import PRINCIPAL_KEY, Guard


class Authenticate:
    def __init__(self, app: ASGIApp, guard: Guard, protected: Callable[[str], bool]) -> None:
        self.app, self.guard, self.protected = app, guard, protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.protected(scope["path"]):
            try:
                scope[PRINCIPAL_KEY] = await self.guard.admit(scope)
            except HTTPException as exc:
                headers = {**(exc.headers or {}), **close_if_unread(scope)}
                response = JSONResponse({"detail": exc.detail}, exc.status_code, headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
