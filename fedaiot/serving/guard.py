"""Who may call: the token check and rate limits (``admit``), and each route's role check.

``admit`` runs in the ``Authenticate`` middleware, on the request's headers alone, before any
routing and before any body is read: no token or a refused one 401 (a fixed text per reason,
see ``reasons.TOKEN_REASONS``), or 429 once the client address has had too many of those; over
the role's request rate 429. ``require(permission)`` is the routes' FastAPI dependency: a role
without the permission 403.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Scope

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
PRINCIPAL_KEY = "fedaiot.principal"  # the admitted caller, in the request's scope

# Only for the OpenAPI document (the security scheme): the token is read by ``admit``.
_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT from `fedaiot token issue` (or the configured OpenID Connect issuer).",
)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class Guard:
    """The token verifier and the limiters; ``admit`` a request, ``require`` a permission."""

    def __init__(
        self, verifier: TokenVerifier, limiter: RateLimiter, addresses: AddressLimiter
    ) -> None:
        self.verifier = verifier
        self.limiter = limiter
        self.addresses = addresses

    async def admit(self, scope: Scope) -> Principal:
        """The caller of this request, or HTTPException (401, 429)."""
        token = bearer_token(scope)
        try:
            if token is None:
                raise TokenError("missing_token")
            if self.verifier.blocking:
                principal = await run_in_threadpool(self.verifier.verify, token)
            else:
                principal = self.verifier.verify(token)
        except TokenError as exc:
            raise self._refuse(scope, exc, token or "") from None
        audit_fields(scope, subject=principal.subject, role=principal.role, jti=principal.jti)
        if principal.role in self.limiter.roles:
            wait = self.limiter.request(principal.role, principal.subject)
        else:  # a valid token without a known role: limited like a caller without a token
            wait = self.addresses.take(client_address(scope))
        if wait > 0:
            audit_fields(scope, reason=reasons.RATE_LIMITED)
            retry = retry_after(wait)
            detail = f"rate limit of role {principal.role!r} exceeded: retry in {retry} s"
            raise HTTPException(429, detail, {"Retry-After": retry})
        return principal

    def _refuse(self, scope: Scope, exc: TokenError, token: str) -> HTTPException:
        address = client_address(scope)
        log.debug("token refused from %s (%s): %s", address, exc.code, exc.detail)
        if exc.principal is not None:  # it verified (then was revoked): who it is is known
            known = exc.principal
            audit_fields(
                scope, reason=exc.code, subject=known.subject, role=known.role, jti=known.jti
            )
        else:
            claimed = unverified_claims(token) if token else {}
            note = " ".join(f"{k}={v}" for k, v in claimed.items() if k != "jti")
            audit_fields(
                scope,
                reason=exc.code,
                jti=claimed.get("jti"),
                note=f"unverified claims: {note}" if note else None,
            )
        wait = self.addresses.take(address)
        if wait > 0:
            audit_fields(scope, reason=reasons.UNAUTHENTICATED_RATE_LIMITED)
            retry = retry_after(wait)
            detail = f"too many calls without a valid token from this address: retry in {retry} s"
            return HTTPException(429, detail, {"Retry-After": retry})
        public = str(exc)  # a fixed ASCII text: safe in a header
        challenge = "Bearer"
        if exc.code != "missing_token":
            challenge = f'Bearer error="invalid_token", error_description="{public}"'
        return HTTPException(401, public, {"WWW-Authenticate": challenge})

    def require(self, permission: str) -> Callable[..., Awaitable[Principal]]:
        """The dependency of a route that needs ``permission``."""
        if permission not in PERMISSIONS:
            raise KeyError(permission)

        async def dependency(
            request: Request,
            _: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
        ) -> Principal:
            principal = request.scope.get(PRINCIPAL_KEY)
            if not isinstance(principal, Principal):  # a route outside Authenticate's paths
                raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
            if principal.role == "none":
                audit_fields(request, reason=reasons.NO_ROLE)
                raise HTTPException(403, "the token carries no known role")
            if not principal.can(permission):
                audit_fields(request, reason=reasons.FORBIDDEN)
                raise HTTPException(403, f"role {principal.role!r} may not {WHAT[permission]}")
            return principal

        return dependency
