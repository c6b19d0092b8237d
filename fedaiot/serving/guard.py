"""The FastAPI dependency that authenticates, authorizes and rate-limits a call.

It answers, in this order: no token or a refused one 401 (a fixed text per reason, see
``reasons.TOKEN_REASONS``), or 429 once the client address has had too many of those; a role
without the permission 403; over the role's request rate 429. It runs before any request body
is read: the routes that take a body read it themselves, after this.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedaiot.serving import reasons
from fedaiot.serving.auth import (
    PERMISSIONS,
    WHAT,
    Principal,
    TokenError,
    TokenVerifier,
    unverified_claims,
)
from fedaiot.serving.limits import AddressLimiter, RateLimiter
from fedaiot.serving.observe import audit_fields, client_address

log = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT from `fedaiot token issue` (or the configured OpenID Connect issuer).",
)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Guard:
    """Builds the dependency of each permission; holds the verifier and the limiters."""

    def __init__(
        self, verifier: TokenVerifier, limiter: RateLimiter, addresses: AddressLimiter
    ) -> None:
        self.verifier = verifier
        self.limiter = limiter
        self.addresses = addresses

    async def authenticate(self, request: Request, token: str | None) -> Principal:
        try:
            if not token:
                raise TokenError("missing_token")
            if self.verifier.blocking:
                principal = await run_in_threadpool(self.verifier.verify, token)
            else:
                principal = self.verifier.verify(token)
        except TokenError as exc:
            raise self._refuse(request, exc, token or "") from None
        audit_fields(request, subject=principal.subject, role=principal.role, jti=principal.jti)
        return principal

    def _refuse(self, request: Request, exc: TokenError, token: str) -> HTTPException:
        address = client_address(request)
        log.debug("token refused from %s (%s): %s", address, exc.code, exc.detail)
        claimed = unverified_claims(token) if token else {}
        note = " ".join(f"{k}={v}" for k, v in claimed.items() if k != "jti")
        audit_fields(
            request,
            reason=exc.code,
            jti=claimed.get("jti"),
            note=f"unverified claims: {note}" if note else None,
        )
        wait = self.addresses.take(address)
        if wait > 0:
            audit_fields(request, reason=reasons.UNAUTHENTICATED_RATE_LIMITED)
            retry = retry_after(wait)
            detail = f"too many calls without a valid token from this address: retry in {retry} s"
            return HTTPException(429, detail, {"Retry-After": retry})
        public = str(exc)  # a fixed ASCII text: safe in a header
        challenge = "Bearer"
        if exc.code != "missing_token":
            challenge = f'Bearer error="invalid_token", error_description="{public}"'
        return HTTPException(401, public, {"WWW-Authenticate": challenge})

    def require(self, permission: str) -> Callable[..., Awaitable[Principal]]:
        if permission not in PERMISSIONS:
            raise KeyError(permission)

        async def dependency(
            request: Request,
            credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
        ) -> Principal:
            principal = await self.authenticate(
                request, credentials.credentials if credentials else None
            )
            if principal.role == "none":
                audit_fields(request, reason=reasons.NO_ROLE)
                raise HTTPException(403, "the token carries no known role")
            if not principal.can(permission):
                audit_fields(request, reason=reasons.FORBIDDEN)
                raise HTTPException(403, f"role {principal.role!r} may not {WHAT[permission]}")
            wait = self.limiter.request(principal.role, principal.subject)
            if wait > 0:
                audit_fields(request, reason=reasons.RATE_LIMITED)
                retry = retry_after(wait)
                detail = f"rate limit of role {principal.role!r} exceeded: retry in {retry} s"
                raise HTTPException(429, detail, {"Retry-After": retry})
            return principal

        return dependency
