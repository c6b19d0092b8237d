"""Reason codes: why a call ended as it did, in the audit log and (for refusals) the response.

Every refused token gets one of the ``TOKEN_REASONS``; its text is fixed here, ASCII, and is all
the caller learns (it also goes into ``WWW-Authenticate``). What the token library said goes to
the server's debug log only: it may quote the caller's own header text.
"""

from __future__ import annotations

# Token refusals (401): code -> the fixed text the caller sees.
TOKEN_REASONS: dict[str, str] = {
    "missing_token": "missing bearer token",
    "malformed_token": "malformed token",
    "bad_signature": "token signature invalid (not signed by a trusted key)",
    "bad_algorithm": "token algorithm not allowed",
    "unknown_key": "token signing key unknown",
    "key_unavailable": "token signing key unavailable",
    "expired": "token expired",
    "not_yet_valid": "token not valid yet (nbf/iat in the future)",
    "wrong_audience": "token audience rejected",
    "wrong_issuer": "token issuer rejected",
    "missing_claim": "token lacks a required claim (exp, iat, sub, iss, aud)",
    "bad_claim": "token claims invalid: exp, iat and nbf must be integers, sub a string",
    "lifetime_too_long": "token lifetime exceeds the server's maximum",
    "revoked": "token revoked",
    "invalid_token": "invalid token",
}

# Every other outcome a row can carry.
OK = "ok"
NO_ROLE = "no_role"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
ROWS_RATE_LIMITED = "rows_rate_limited"
QUOTA_EXHAUSTED = "quota_exhausted"
UNAUTHENTICATED_RATE_LIMITED = "unauthenticated_rate_limited"
BODY_TOO_LARGE = "body_too_large"
BODY_TIMEOUT = "body_timeout"
BAD_INPUT = "bad_input"
OUT_OF_RANGE = "out_of_range"
NO_FINITE_OUTPUT = "no_finite_output"
BUSY = "busy"
# Connections turned away before a request reached the app (the audit's endpoint: "(connection)").
ADDRESS_BLOCKED = "address_blocked"
HEADERS_TOO_LARGE = "headers_too_large"
HEADER_TIMEOUT = "header_timeout"
CONNECTION_STATUS = {ADDRESS_BLOCKED: 429, HEADERS_TOO_LARGE: 431, HEADER_TIMEOUT: 408}
# What the alert engine did (endpoints "(alert)" and "(monitor)").
ALERT_FIRING = "alert_firing"
ALERT_RESOLVED = "alert_resolved"
ALERT_DECISION = "alert_decision"
ALERT_ROLLBACK = "alert_rollback"
GATE_PROMOTE = "gate_promote"
GATE_REFUSE = "gate_refuse"
NOT_FOUND = "not_found"
REFUSED = "refused"
FAILED = "failed"
ERROR = "error"

_BY_STATUS = {
    200: OK,
    401: "invalid_token",
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: "method_not_allowed",
    408: BODY_TIMEOUT,
    409: REFUSED,
    413: BODY_TOO_LARGE,
    422: BAD_INPUT,
    429: RATE_LIMITED,
    503: FAILED,
}


def for_status(status: int) -> str:
    """The reason of a row whose handler named none: what its status says."""
    return _BY_STATUS.get(status, OK if status < 400 else ERROR)
