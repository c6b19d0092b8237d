"""The inference service's configuration: one typed pydantic model.

Built from keyword arguments (tests, ``fedaiot serve``'s options) or from the environment with
``ServingSettings.from_env()``: every field can be set as ``FEDAIOT_SERVE_<FIELD>`` (upper
case), ``rate_limits`` as JSON (``{"device": {"per_second": 2, "burst": 5}}``, merged over the
defaults). pydantic-settings is not a dependency of fedaiot, so this is plain pydantic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "FEDAIOT_SERVE_"
Role = Literal["clinician", "device", "auditor", "admin"]
ROLES: tuple[Role, ...] = ("clinician", "device", "auditor", "admin")


class RateLimit(BaseModel):
    """A token bucket per subject: ``burst`` requests at once, refilled at ``per_second``."""

    model_config = ConfigDict(extra="forbid")
    per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


def default_rate_limits() -> dict[str, RateLimit]:
    return {
        "clinician": RateLimit(per_second=50, burst=100),
        "device": RateLimit(per_second=5, burst=10),
        "auditor": RateLimit(per_second=10, burst=20),
        "admin": RateLimit(per_second=100, burst=200),
    }


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
    leeway_seconds: float = Field(default=5.0, ge=0)
    # Model signatures are always checked with this key; default: ``public_key``.
    model_public_key: Path | None = None
    # SQLite audit log: a path or a sqlite:/// URL; default: <registry>/audit.sqlite3.
    audit_db: str | None = None
    max_batch: int = Field(default=256, ge=1, le=100_000)
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    rate_limits: dict[str, RateLimit] = Field(default_factory=default_rate_limits)
    metrics_auth: Literal["none", "admin"] = "none"
    served_history: int = Field(default=20, ge=2)
    # Applied process-wide by `fedaiot serve` (torch.set_num_threads). One intra-op thread is
    # fastest for small models: on 2 CPUs, 64 rows took 8 ms with 2 threads and 1 ms with 1.
    torch_threads: int = Field(default=1, ge=1, le=256)

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
                values[name] = (
                    json.loads(raw) if name in ("rate_limits", "jwks_algorithms") else raw
                )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def settings_error(exc: ValidationError) -> str:
    """One line naming what is wrong in the settings."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"invalid serving settings: {where + ': ' if where else ''}{first['msg']}"
