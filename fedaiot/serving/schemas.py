"""Request and response bodies of the inference service (they make its OpenAPI schema)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from fedaiot.registry import Manifest, ModelRegistry, NodePrivacy, RegistryError

Number = Annotated[float, Field(strict=True)]  # ints and floats; no strings, no booleans


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[Number] | dict[str, Number]] = Field(
        description=(
            "A batch of instances: each a list of the model's input values (flattened in C "
            "order), or, for a model with feature names, an object of feature name -> value."
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
        training_config=manifest.config,
        input_schema=manifest.input_schema,
        weights_sha256=manifest.weights_sha256,
        created=datetime.fromtimestamp(manifest.created, UTC).isoformat(timespec="seconds"),
    )


class VersionInfo(BaseModel):
    version: str
    round: int | None = None
    accuracy: float | None = None
    served: bool
    refs: list[str] = Field(default_factory=list)
    error: str | None = Field(default=None, description="why the manifest is unreadable")


class ModelList(BaseModel):
    served: str
    history: list[str] = Field(description="served versions, oldest first (rollback walks back)")
    versions: list[VersionInfo]

    @classmethod
    def build(cls, registry: ModelRegistry, served: str, history: list[str]) -> ModelList:
        try:
            refs = registry.refs()
        except RegistryError:
            refs = {}
        versions = []
        for version in registry.versions():
            marks = sorted(name for name, v in refs.items() if v == version)
            info = VersionInfo(version=version, served=version == served, refs=marks)
            try:
                manifest = registry.manifest(version)
                accuracy = manifest.metrics.get("accuracy")
                info.round = manifest.round
                info.accuracy = (
                    accuracy if accuracy is not None and math.isfinite(accuracy) else None
                )
            except RegistryError as exc:
                info.error = str(exc)
            versions.append(info)
        return cls(served=served, history=history, versions=versions)


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
    method: str
    endpoint: str
    model_version: str | None
    rows: int | None
    status: int
    duration_ms: float
    note: str | None


class AuditEntries(BaseModel):
    entries: list[AuditEntry]


class Health(BaseModel):
    status: str
    model_version: str
