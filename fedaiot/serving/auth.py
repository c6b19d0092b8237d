"""Bearer tokens (JWT, EdDSA), roles, per-subject rate limits, and the FastAPI guard.

Tokens are issued by ``fedaiot token issue`` with the coordinator's Ed25519 key (pyjwt, alg
``EdDSA``, header ``kid`` = the key id). Claims: ``iss``, ``aud``, ``sub`` (who), ``role`` (one of
``ROLES``), ``iat``, ``nbf``, ``exp``, ``jti``; all but ``nbf``/``jti`` are required on
verification. In production the service can verify tokens of an OpenID Connect issuer instead,
fetching its keys with ``jwt.PyJWKClient`` (``jwks_url`` in the settings).

The guard answers, in this order: no token 401, bad or expired token 401 (the reason in
``detail``), a role without the permission 403, over the role's rate limit 429.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedaiot.serving.settings import ROLES, RateLimit, Role, ServingSettings
from fedaiot.signing import key_id, load_public_key

AUDIT_SCOPE_KEY = "fedaiot.audit"  # the per-request audit fields, shared with the middleware

# What each role may do. Probabilities are a refinement of "predict": a device gets labels only.
PERMISSIONS: dict[str, frozenset[Role]] = {
    "predict": frozenset({"clinician", "device", "admin"}),
    "probabilities": frozenset({"clinician", "admin"}),
    "model_card": frozenset({"auditor", "admin"}),
    "models": frozenset({"auditor", "admin"}),
    "audit": frozenset({"auditor", "admin"}),
    "manage": frozenset({"admin"}),
    "metrics": frozenset({"admin"}),
}
_WHAT = {
    "predict": "predict",
    "probabilities": "see probabilities",
    "model_card": "read the model card",
    "models": "list model versions",
    "audit": "read the audit log",
    "manage": "promote or roll back models",
    "metrics": "read metrics",
}
_ALWAYS_REQUIRED = ["exp", "iat", "sub", "iss", "aud"]


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: str  # one of ROLES, or "none" when the token names no known role

    def can(self, permission: str) -> bool:
        return self.role in PERMISSIONS[permission]


class TokenError(Exception):
    """A token that does not authenticate anyone: the reason is safe to return."""


def issue_token(
    key: Ed25519PrivateKey,
    *,
    subject: str,
    role: str,
    ttl_seconds: float,
    issuer: str = "fedaiot",
    audience: str = "fedaiot-serving",
    now: float | None = None,
) -> str:
    """A signed bearer token for ``subject`` acting as ``role`` for ``ttl_seconds``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if not subject:
        raise ValueError("the token subject must not be empty")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "role": role,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    headers = {"kid": key_id(key.public_key())}
    return jwt.encode(claims, key, algorithm="EdDSA", headers=headers)


def _reason(exc: jwt.PyJWTError) -> str:
    match exc:
        case jwt.ExpiredSignatureError():
            return "token expired"
        case jwt.ImmatureSignatureError():
            return "token not valid yet (nbf/iat in the future)"
        case jwt.InvalidSignatureError():
            return "token signature invalid (not signed by a trusted key)"
        case jwt.InvalidAudienceError():
            return f"token audience rejected: {exc}"
        case jwt.InvalidIssuerError():
            return f"token issuer rejected: {exc}"
        case jwt.MissingRequiredClaimError():
            return f"token lacks the required {exc.claim!r} claim"
        case jwt.InvalidAlgorithmError():
            return "token algorithm not allowed"
        case jwt.PyJWKClientError():
            return f"token signing key unavailable: {exc}"
        case jwt.DecodeError():
            return f"malformed token: {exc}"
    return f"invalid token: {exc}"


class TokenVerifier:
    """Checks a bearer token against the coordinator's public key, or an OIDC issuer's JWKS."""

    def __init__(self, settings: ServingSettings) -> None:
        self._settings = settings
        self._key: Ed25519PublicKey | None = None
        self._jwks: jwt.PyJWKClient | None = None
        if settings.public_key is not None:
            self._key = load_public_key(settings.public_key)
            self._algorithms = ["EdDSA"]
        else:
            assert settings.jwks_url is not None
            self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300)
            self._algorithms = list(settings.jwks_algorithms)

    @property
    def blocking(self) -> bool:
        """Verification may fetch keys over the network (JWKS): run it off the event loop."""
        return self._jwks is not None

    def verify(self, token: str) -> Principal:
        s = self._settings
        try:
            key: Any = self._key
            if self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_seconds,
                options={"require": _ALWAYS_REQUIRED},
            )
        except jwt.PyJWTError as exc:
            raise TokenError(_reason(exc)) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise TokenError("token subject must be a non-empty string")
        role = claims.get(s.role_claim)
        if isinstance(role, list):  # OIDC providers often carry a list of roles
            known = [r for r in role if r in ROLES]
            role = known[0] if len(known) == 1 else None
        return Principal(subject=subject, role=role if role in ROLES else "none")


class RateLimiter:
    """An in-memory token bucket per (role, subject); thread-safe, bounded in size."""

    def __init__(self, limits: dict[str, RateLimit], max_buckets: int = 100_000) -> None:
        self._limits = limits
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._max_buckets = max_buckets

    def take(self, role: str, subject: str, now: float | None = None) -> float:
        """Spend one request; 0.0 when allowed, else the seconds until one is available."""
        limit = self._limits[role]
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get((role, subject), (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - last) * limit.per_second)
            if tokens < 1.0:
                self._buckets[(role, subject)] = (tokens, now)
                return (1.0 - tokens) / limit.per_second
            self._buckets[(role, subject)] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_buckets:
                self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled: they are the same as new ones."""
        for key, (tokens, last) in list(self._buckets.items()):
            limit = self._limits[key[0]]
            if tokens + (now - last) * limit.per_second >= limit.burst:
                del self._buckets[key]


_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT from `fedaiot token issue` (or the configured OpenID Connect issuer).",
)


def _unauthorized(reason: str) -> HTTPException:
    challenge = f'Bearer error="invalid_token", error_description="{reason}"'
    return HTTPException(401, detail=reason, headers={"WWW-Authenticate": challenge})


class Guard:
    """Builds the FastAPI dependency that authenticates, authorizes and rate-limits a call."""

    def __init__(self, verifier: TokenVerifier, limiter: RateLimiter) -> None:
        self.verifier = verifier
        self.limiter = limiter

    async def authenticate(self, request: Request, token: str | None) -> Principal:
        if not token:
            raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            if self.verifier.blocking:
                principal = await run_in_threadpool(self.verifier.verify, token)
            else:
                principal = self.verifier.verify(token)
        except TokenError as exc:
            raise _unauthorized(str(exc)) from None
        audit = request.scope.get(AUDIT_SCOPE_KEY)
        if audit is not None:
            audit["subject"], audit["role"] = principal.subject, principal.role
        return principal

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
                raise HTTPException(403, "the token carries no known role")
            if not principal.can(permission):
                raise HTTPException(403, f"role {principal.role!r} may not {_WHAT[permission]}")
            wait = self.limiter.take(principal.role, principal.subject)
            if wait > 0:
                retry = str(max(1, int(wait + 0.999)))
                detail = f"rate limit of role {principal.role!r} exceeded: retry in {retry} s"
                raise HTTPException(429, detail, {"Retry-After": retry})
            return principal

        return dependency
