"""Request and response bodies of the inference service (they make its OpenAPI schema)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedaiot.registry.store import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    ModelRegistry,
    NodePrivacy,
    RegistryError,
)
from fedaiot.serving.redact import without_paths

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
Number = Annotated[float, Field(strict=True)]  # ints and floats; no strings, no booleans
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no token, or a refused one (a fixed reason in detail)"},
    403: {"description": "the token's role may not call this endpoint"},
    429: {"description": "a rate limit or quota is reached (see Retry-After)"},
}


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[Number] | dict[str, Number | str | bool | None]] = Field(
        description=(
            "A batch of instances: each a list of the model's input values (flattened in C "
            "order), or, for a model with feature names, an object of feature name -> value "
            "(a study's model: numbers, category levels, true/false, null where imputed)."
        ),
    )


class Prediction(BaseModel):
    label: str
    class_index: int
    probabilities: dict[str, float] | None = Field(
        default=None, description="class name -> probability (clinician and admin only)"
    )


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


class ModelCard(BaseModel):
    version: str
    run: str
    task: str
    architecture: str
    round: int
    metrics: dict[str, float]
    nodes: list[NodePrivacy] = Field(description="each node's examples, epsilon and delta")
    privacy: dict[str, Any] = Field(
        default_factory=dict,
        description="the guarantee, the noise, what the nodes sent the coordinator in the clear",
    )
    study: str | None = Field(
        default=None, description="the study the model was trained for: id@version, title"
    )
    training_config: dict[str, Any]
    input_schema: dict[str, Any]
    weights_sha256: str
    created: str
    signature_verified: bool = True


def model_card(manifest: Manifest) -> ModelCard:
    return ModelCard(
        version=manifest.version,
        run=manifest.run,
        task=manifest.task,
        architecture=manifest.architecture,
        round=manifest.round,
        metrics={k: v for k, v in manifest.metrics.items() if math.isfinite(v)},
        nodes=manifest.nodes,
        privacy=manifest.privacy,
        study=_study_line(manifest.input_schema),
        training_config=without_paths(manifest.config),
        input_schema=manifest.input_schema,
        weights_sha256=manifest.weights_sha256,
        created=datetime.fromtimestamp(manifest.created, UTC).isoformat(timespec="seconds"),
    )


def _study_line(input_schema: dict[str, Any]) -> str | None:
    study = input_schema.get("study")
    if not isinstance(study, dict) or not isinstance(study.get("study"), dict):
        return None
    header = study["study"]
    return f"{header.get('id')}@{header.get('version')}: {header.get('title', '')}".rstrip(": ")


Verification = Literal["verified", "unsigned", "bad-signature", "unreadable"]


class VersionInfo(BaseModel):
    version: str
    verification: Verification = Field(
        description="the manifest's signature against the coordinator's key; the weights' hash "
        "is checked when a version is loaded (the served one, a promoted one)"
    )
    round: int | None = Field(default=None, description="verified versions only")
    accuracy: float | None = Field(default=None, description="verified versions only")
    served: bool
    refs: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    served: str
    history: list[str] = Field(description="served versions, oldest first (rollback walks back)")
    versions: list[VersionInfo]

    @classmethod
    def build(
        cls, registry: ModelRegistry, key: Ed25519PublicKey, served: str, history: list[str]
    ) -> ModelList:
        try:
            refs = registry.refs()
        except RegistryError:
            refs = {}
        versions = []
        for version in registry.versions():
            marks = sorted(name for name, v in refs.items() if v == version)
            status, manifest = _verified(registry, key, version)
            info = VersionInfo(
                version=version, verification=status, served=version == served, refs=marks
            )
            if manifest is not None:  # metrics only from a manifest whose signature holds
                accuracy = manifest.metrics.get("accuracy")
                info.round = manifest.round
                info.accuracy = (
                    accuracy if accuracy is not None and math.isfinite(accuracy) else None
                )
            versions.append(info)
        return cls(served=served, history=history, versions=versions)


def _verified(
    registry: ModelRegistry, key: Ed25519PublicKey, version: str
) -> tuple[Verification, Manifest | None]:
    folder = registry.root / "versions" / version
    try:
        return "verified", registry.verify(version, key)
    except RegistryError:
        if not (folder / MANIFEST).is_file():
            return "unreadable", None
        if not (folder / SIGNATURE).is_file():
            return "unsigned", None
        return "bad-signature", None


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(
        default="", max_length=500, description="why: written to the audit log with the swap"
    )

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str) -> str:
        # The audit log is read in terminals (fedaiot audit): no control characters.
        return " ".join("".join(c if c.isprintable() else " " for c in value).split())


class SwapResult(BaseModel):
    served: str
    previous: str


class AuditEntry(BaseModel):
    id: int
    time: str
    unix: float
    request_id: str
    subject: str | None
    role: str | None
    client: str | None
    jti: str | None
    method: str
    endpoint: str
    model_version: str | None
    rows: int | None
    status: int
    reason: str | None
    count: int = Field(description="calls the row stands for (> 1: an aggregate of refusals)")
    duration_ms: float
    note: str | None


class AuditEntries(BaseModel):
    entries: list[AuditEntry]


class Health(BaseModel):
    status: str
    model_version: str
