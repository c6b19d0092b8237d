"""Bearer tokens (JWT, EdDSA) and roles: issuing, verifying, and what each role may do.

Tokens are issued by ``fedaiot token issue`` with the coordinator's Ed25519 key (pyjwt, alg
``EdDSA``, header ``kid`` = the key id). Claims: ``iss``, ``aud``, ``sub`` (who), ``role`` (one of
``ROLES``), ``iat``, ``nbf``, ``exp``, ``jti``. In production the service can verify tokens of an
OpenID Connect issuer instead, fetching its keys with ``jwt.PyJWKClient`` (``jwks_url``).

Whatever goes wrong, ``TokenVerifier.verify`` raises ``TokenError`` with one of the fixed reason
codes of ``fedaiot.serving.reasons``: never another exception, never the library's own text.
A token that verified is remembered (by its exact text, at most 5 minutes and never past its
``exp``), so a caller's next requests skip the signature check; the revocation list
(``fedaiot.serving.revocation``) is checked on every request, remembered or not.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedaiot.errors import BadInputError, SecurityError
from fedaiot.registry.signing import key_id, load_public_key
from fedaiot.serving.reasons import TOKEN_REASONS
from fedaiot.serving.redact import label
from fedaiot.serving.revocation import RevocationWatch
from fedaiot.serving.settings import ROLES, Role, ServingSettings

log = logging.getLogger(__name__)

# What each role may do. Probabilities are a refinement of "predict": a device gets labels only.
PERMISSIONS: dict[str, frozenset[Role]] = {
    "predict": frozenset({"clinician", "device", "admin"}),
    "probabilities": frozenset({"clinician", "admin"}),
    "model_card": frozenset({"auditor", "admin"}),
    "models": frozenset({"auditor", "admin"}),
    "audit": frozenset({"auditor", "admin"}),
    "manage": frozenset({"admin"}),
    "metrics": frozenset({"admin"}),
    "edge": frozenset({"device", "admin"}),
    "alerts": frozenset({"auditor", "admin"}),
}
WHAT = {
    "predict": "predict",
    "probabilities": "see probabilities",
    "model_card": "read the model card",
    "models": "list model versions",
    "audit": "read the audit log",
    "manage": "promote or roll back models",
    "metrics": "read metrics",
    "edge": "download edge artifacts",
    "alerts": "read alerts",
}
_ALWAYS_REQUIRED = ["exp", "iat", "sub", "iss", "aud"]
_NUMERIC_DATES = ("exp", "iat", "nbf")
MAX_TOKEN_CHARS = 8192  # ours are ~400; an OIDC token with many groups stays well below
_CACHE_SIZE = 10_000
_CACHE_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: str  # one of ROLES, or "none" when the token names no known role
    jti: str | None = None
    issued_at: int = 0  # the token's iat

    def can(self, permission: str) -> bool:
        return self.role in PERMISSIONS[permission]


class TokenError(SecurityError):
    """A token that authenticates no one. ``str()`` is the fixed public text of ``code``;
    ``detail`` (the library's words) is for the server's log only. ``principal``: who a token
    that verified but was refused anyway (revoked) belongs to, for the audit log."""

    def __init__(self, code: str, detail: str = "", principal: Principal | None = None) -> None:
        super().__init__(TOKEN_REASONS[code])
        self.code = code
        self.detail = detail
        self.principal = principal


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
        raise BadInputError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
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


def _code(exc: jwt.PyJWTError) -> str:
    # Order matters: several of these subclass DecodeError or PyJWKClientError.
    match exc:
        case jwt.ExpiredSignatureError():
            return "expired"
        case jwt.ImmatureSignatureError():
            return "not_yet_valid"
        case jwt.InvalidSignatureError():
            return "bad_signature"
        case jwt.InvalidAudienceError():
            return "wrong_audience"
        case jwt.InvalidIssuerError():
            return "wrong_issuer"
        case jwt.MissingRequiredClaimError():
            return "missing_claim"
        case (
            jwt.InvalidIssuedAtError()
            | jwt.exceptions.InvalidSubjectError()
            | jwt.exceptions.InvalidJTIError()
        ):
            return "bad_claim"
        case jwt.InvalidAlgorithmError():
            return "bad_algorithm"
        case jwt.PyJWKClientConnectionError():
            return "key_unavailable"
        case jwt.PyJWKClientError() | jwt.PyJWKError() | jwt.PyJWKSetError():
            return "unknown_key"
        case jwt.DecodeError():
            return "malformed_token"
    return "invalid_token"


def unverified_claims(token: str) -> dict[str, str]:
    """What a refused token claims (sub, role, jti), reduced to short safe labels, for the
    audit log's forensics. Never trusted: it is only what the caller wrote."""
    try:
        segment = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, binascii.Error, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    found = {name: label(data.get(name)) for name in ("sub", "role", "jti")}
    return {name: value for name, value in found.items() if value}


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
        self._revocations: RevocationWatch | None = None
        if settings.revocation_list is not None:
            self._revocations = RevocationWatch(
                settings.revocation_list, load_public_key(settings.model_key_path)
            )
        # token text -> (principal, valid from, valid until), in unix seconds
        self._verified: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def blocking(self) -> bool:
        """Verification may fetch keys over the network (JWKS): run it off the event loop."""
        return self._jwks is not None

    def verify(self, token: str) -> Principal:
        principal = self._verified_principal(token)
        revocations = self._revocations
        if revocations is not None and revocations.refuses(
            principal.jti, principal.subject, principal.issued_at
        ):
            detail = f"revocation list serial {revocations.serial}"
            raise TokenError("revoked", detail, principal)
        return principal

    def _verified_principal(self, token: str) -> Principal:
        now = time.time()
        with self._lock:
            known = self._verified.get(token)
        if known is not None and known[1] <= now < known[2]:
            return known[0]
        try:
            principal, claims = self._verify(token)
        except TokenError:
            raise
        except jwt.PyJWTError as exc:
            raise TokenError(_code(exc), repr(exc)) from None
        except Exception as exc:
            # Hostile tokens reach corners of the JWT and crypto libraries that raise TypeError,
            # OverflowError, ... A token is either valid or refused: never a server error.
            raise TokenError("invalid_token", repr(exc)) from None
        leeway = self._settings.leeway_seconds
        start = max(claims["iat"], claims.get("nbf", claims["iat"])) - leeway
        end = min(claims["exp"] + leeway, now + _CACHE_SECONDS)
        with self._lock:
            self._verified[token] = (principal, start, end)
            if len(self._verified) > _CACHE_SIZE:
                self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, dict[str, Any]]:
        s = self._settings
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("malformed_token", f"{len(token)} characters")
        key: Any = self._key
        algorithms = self._algorithms
        if self._jwks is not None:
            jwk = self._jwks.get_signing_key_from_jwt(token)
            if jwk.algorithm_name not in algorithms:
                raise TokenError("bad_algorithm", f"key algorithm {jwk.algorithm_name}")
            # The header's alg must be the key's own: an RS256 header on an Ed25519 key is
            # refused here, not handed to the wrong verifier.
            key, algorithms = jwk.key, [jwk.algorithm_name]
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=s.audience,
            issuer=s.issuer,
            leeway=s.leeway_seconds,
            options={"require": _ALWAYS_REQUIRED},
        )
        self._check_claims(claims)
        role = claims.get(s.role_claim)
        if isinstance(role, list):  # OIDC providers often carry a list of roles
            known = [r for r in role if isinstance(r, str) and r in ROLES]
            role = known[0] if len(known) == 1 else None
        jti = claims.get("jti")
        principal = Principal(
            subject=claims["sub"],
            role=role if isinstance(role, str) and role in ROLES else "none",
            jti=jti if isinstance(jti, str) and 0 < len(jti) <= 128 else None,
            issued_at=claims["iat"],
        )
        return principal, claims

    def _check_claims(self, claims: dict[str, Any]) -> None:
        s = self._settings
        for name in _NUMERIC_DATES:
            # pyjwt takes int(...) of these: "1e30", 1e30 and "99999999999" would pass.
            if name in claims and type(claims[name]) is not int:
                raise TokenError("bad_claim", f"{name} is a {type(claims[name]).__name__}")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 256:
            raise TokenError("bad_claim", "sub")
        longest = s.max_token_lifetime_seconds
        if claims["exp"] - claims["iat"] > longest:
            raise TokenError("lifetime_too_long", "exp - iat")
        if claims["exp"] - time.time() > longest + s.leeway_seconds:
            raise TokenError("lifetime_too_long", "exp - now")
