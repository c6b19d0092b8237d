"""The inference service's configuration: one typed pydantic model.

Built from keyword arguments (tests, ``fedaiot serve``'s options) or from the environment with
``ServingSettings.from_env()``: every field can be set as ``FEDAIOT_SERVE_<FIELD>`` (upper
case); the structured ones (``rate_limits``, ``unauthenticated_limit``, ``jwks_algorithms``,
``trusted_proxies``) as JSON, e.g. ``{"device": {"per_second": 2, "burst": 5}}``, merged over
the defaults. pydantic-settings is not a dependency of fedaiot, so this is plain pydantic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "FEDAIOT_SERVE_"
Role = Literal["clinician", "device", "auditor", "admin"]
ROLES: tuple[Role, ...] = ("clinician", "device", "auditor", "admin")
_JSON_FIELDS = ("rate_limits", "unauthenticated_limit", "jwks_algorithms", "trusted_proxies")
DAY = 86_400


class RateLimit(BaseModel):
    """Token buckets per subject: ``burst`` requests at once, refilled at ``per_second``; the
    same for predicted rows; and a quota of rows per UTC day (0: this role predicts nothing)."""

    model_config = ConfigDict(extra="forbid")
    per_second: float = Field(gt=0)
    burst: int = Field(ge=1)
    rows_per_second: float = Field(default=256.0, gt=0)
    rows_burst: int = Field(default=1024, ge=1)
    rows_per_day: int = Field(default=2048, ge=0)


def default_rate_limits() -> dict[str, RateLimit]:
    # A device sends one reading at a time; a clinician a few cases, sometimes a batch. The
    # daily row quotas slow a copy of the model down (docs/serving.md, "extraction").
    return {
        "clinician": RateLimit(
            per_second=50, burst=100, rows_per_second=256, rows_burst=1024, rows_per_day=2048
        ),
        "device": RateLimit(
            per_second=5, burst=10, rows_per_second=5, rows_burst=64, rows_per_day=2048
        ),
        "auditor": RateLimit(
            per_second=10, burst=20, rows_per_second=1, rows_burst=1, rows_per_day=0
        ),
        "admin": RateLimit(
            per_second=100, burst=200, rows_per_second=10_000, rows_burst=10_000,
            rows_per_day=100_000,
        ),
    }  # fmt: skip


class ServingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: Path
    # Token verification: the coordinator's public key (local), or an OpenID Connect issuer's
    # JWKS. Exactly one of the two.
    public_key: Path | None = None
    jwks_url: str | None = None
    jwks_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    issuer: str = "fedaiot"
    audience: str = "fedaiot-serving"
    role_claim: str = "role"
    leeway_seconds: float = Field(default=5.0, ge=0, le=300)
    # Whatever the issuer wrote, a token may not live longer than this (exp - iat, exp - now).
    max_token_lifetime_seconds: int = Field(default=366 * DAY, ge=1)
    # Model signatures are always checked with this key; default: ``public_key``.
    model_public_key: Path | None = None
    # Revoked tokens (``fedaiot token revoke``), signed with the model key; followed while up.
    revocation_list: Path | None = None
    # SQLite audit log: a path or a sqlite:/// URL; default: <registry>/audit.sqlite3.
    audit_db: str | None = None
    # Refused calls (status >= 400) under a flood: per (who, status, reason, endpoint) this many
    # rows a window one by one, at most ``audit_refused_total`` in all; the rest are counted
    # into one aggregate row per key and window.
    audit_window_seconds: float = Field(default=60.0, gt=0)
    audit_refused_per_key: int = Field(default=10, ge=1)
    audit_refused_total: int = Field(default=200, ge=1)
    audit_max_keys: int = Field(default=1000, ge=1)
    max_batch: int = Field(default=256, ge=1, le=100_000)
    # None: derived from the served model, max_batch * values per instance * 64 bytes + 16 KiB.
    max_body_bytes: int | None = Field(default=None, ge=1024)
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    # Inputs further than this many standard deviations from the training mean get 422.
    input_range_stds: float = Field(default=100.0, ge=1)
    # Models without standardization statistics: the largest absolute input value.
    input_abs_max: float = Field(default=1e6, gt=0)
    probability_decimals: int = Field(default=2, ge=0, le=17)
    inference_threads: int = Field(default=2, ge=1, le=64)
    inference_queue: int = Field(default=64, ge=1)  # requests waiting for a thread; more: 503
    rate_limits: dict[str, RateLimit] = Field(default_factory=default_rate_limits)
    # Calls without a valid token, per client address (401s; past the bucket, 429s).
    unauthenticated_limit: RateLimit = Field(
        default_factory=lambda: RateLimit(per_second=5, burst=20, rows_per_day=0)
    )
    # New connections from an address past that budget are turned away until it refills: held
    # unanswered for blocked_hold_seconds (at most blocked_hold_max at a time), then dropped.
    # (Off behind a trusted proxy: there every connection is the proxy's.)
    block_flooding_addresses: bool = True
    blocked_hold_seconds: float = Field(default=5.0, ge=0, le=60)
    blocked_hold_max: int = Field(default=256, ge=0)
    metrics_auth: Literal["none", "admin"] = "none"
    served_history: int = Field(default=20, ge=2)
    # Applied process-wide by `fedaiot serve` (torch.set_num_threads). One intra-op thread is
    # fastest for small models: on 2 CPUs, 64 rows took 8 ms with 2 threads and 1 ms with 1.
    torch_threads: int = Field(default=1, ge=1, le=256)
    # HTTP: request line and headers together, and the time a client has to send them.
    max_header_bytes: int = Field(default=16_384, ge=1024, le=1 << 20)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    keep_alive_seconds: int = Field(default=5, ge=1)
    max_connections: int | None = Field(default=None, ge=1)  # uvicorn's limit_concurrency
    # Addresses whose X-Forwarded-For is believed (a reverse proxy); none by default.
    trusted_proxies: list[str] = Field(default_factory=list)
    # What runs the model: its torch weights, or its signed ONNX artifact (``fedaiot export``),
    # verified before it is loaded: "onnx-int8" or "onnx".
    runtime: Literal["torch", "onnx"] = "torch"
    onnx_artifact: Literal["onnx-int8", "onnx"] = "onnx-int8"
    # Alert rules (YAML, fedaiot.monitoring.rules): what fires, where alerts go, what rolls back.
    alert_rules: Path | None = None
    # Per-version monitoring: the time slots that rule windows and the drift gauges sum over.
    monitor_slot_seconds: float = Field(default=10.0, gt=0, le=3600)
    monitor_horizon_seconds: float = Field(default=3600.0, gt=0, le=7 * DAY)
    # /docs, /redoc and /openapi.json; off by default (the pages load scripts from a CDN).
    docs: bool = False

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _merge_limits(cls, value: Any) -> Any:
        """A role's limits given in part are completed field by field from its defaults."""
        if not isinstance(value, dict):
            return value
        defaults = default_rate_limits()
        merged: dict[str, Any] = {}
        for role, limit in value.items():
            given = (
                limit.model_dump(include=limit.model_fields_set)
                if isinstance(limit, RateLimit)
                else limit
            )
            base = defaults.get(role)
            if isinstance(given, dict) and base is not None:
                given = {**base.model_dump(), **given}
            merged[role] = given
        return merged

    @model_validator(mode="after")
    def _check(self) -> ServingSettings:
        if (self.public_key is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of public_key (local tokens) or jwks_url (OIDC)")
        if self.model_public_key is None and self.public_key is None:
            raise ValueError("model_public_key is required when tokens come from a JWKS")
        unknown = sorted(set(self.rate_limits) - set(ROLES))
        if unknown:
            raise ValueError(f"rate_limits for unknown roles {unknown}: roles are {ROLES}")
        self.rate_limits = {**default_rate_limits(), **self.rate_limits}
        return self

    @property
    def model_key_path(self) -> Path:
        path = self.model_public_key or self.public_key
        assert path is not None  # guaranteed by _check
        return path

    @property
    def audit_path(self) -> Path:
        if self.audit_db is None:
            return self.registry / "audit.sqlite3"
        return Path(self.audit_db.removeprefix("sqlite:///"))

    @classmethod
    def from_env(cls, **overrides: Any) -> ServingSettings:
        """Settings from ``FEDAIOT_SERVE_*`` variables, then ``overrides`` (None: not given)."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = json.loads(raw) if name in _JSON_FIELDS else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def settings_error(exc: ValidationError) -> str:
    """One line naming what is wrong in the settings."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"invalid serving settings: {where + ': ' if where else ''}{first['msg']}"
