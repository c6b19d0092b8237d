"""Edge artifacts for devices: the list of a version's artifacts, and each artifact's model
file, manifest and signature (roles ``device`` and ``admin``).

The service verifies an artifact (signature, names, hash) before handing out any of its three
files, and answers 409 for one that fails: a device verifies again on its side
(``examples/edge_verify_and_run.py``), against a service or a network that cannot be trusted.
The manifest and the signature are sent as the exact bytes on disk, which the signature is over.
"""

import pathlib
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from fedaiot.edge.artifact import (
    ArtifactError,
    ArtifactNotFoundError,
    edge_dir,
    exported,
    read_signed,
    verify_bytes,
)
from fedaiot.serving import reasons
from fedaiot.serving.auth import Principal
from fedaiot.serving.guard import Guard
from fedaiot.serving.holder import ModelHolder
from fedaiot.serving.observe import audit_fields
from fedaiot.serving.schemas import AUTH_ERRORS, VERSION_PATTERN

_NAME = r"^[a-z0-9][a-z0-9-]{0,63}$"
_FILES = {
    "model": ("application/octet-stream", 0),
    "manifest": ("application/json", 1),
    "signature": ("text/plain; charset=ascii", 2),
}


class ArtifactInfo(BaseModel):
    name: str
    verification: str = Field(description="verified, or refused (signature, name or hash)")
    quantization: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    accuracy_change_points: float | None = Field(
        default=None, description="against the float torch model, on the held-out test set"
    )


class ArtifactList(BaseModel):
    version: str
    artifacts: list[ArtifactInfo]


def add_edge_routes(app: FastAPI, guard: Guard, holder: ModelHolder, key: Ed25519PublicKey) -> None:
    """Add the routes to ``app`` itself (an included router is matched lazily by FastAPI,
    out of sight of the audit's route templates)."""
    may = Depends(guard.require("edge"))
    errors = {**AUTH_ERRORS, 404: {"description": "no such version or artifact"}}

    def folder_of(version: str) -> pathlib.Path:
        if version not in holder.registry.versions():
            raise HTTPException(404, "no such model version in the registry")
        return edge_dir(holder.registry.root / "versions" / version)

    def verified(version: str, name: str) -> tuple[bytes, bytes, bytes]:
        try:
            files = read_signed(folder_of(version), name)
            verify_bytes(*files, key, version=version, name=name)
        except ArtifactNotFoundError:
            raise HTTPException(404, f"no {name} artifact for this version") from None
        except ArtifactError as exc:
            raise HTTPException(409, f"artifact refused: {exc}") from None
        return files

    @app.get("/v1/models/{version}/artifacts", response_model=ArtifactList, responses=errors)
    def artifacts(
        request: Request,
        version: Annotated[str, Path(pattern=VERSION_PATTERN)],
        _: Annotated[Principal, may],
    ) -> ArtifactList:
        """The version's edge artifacts and whether each verifies (device, admin)."""
        audit_fields(request, model_version=version)
        found = []
        for name in exported(folder_of(version)):
            try:
                manifest = verify_bytes(
                    *read_signed(folder_of(version), name), key, version=version, name=name
                )
            except (ArtifactError, ArtifactNotFoundError):
                found.append(ArtifactInfo(name=name, verification="refused"))
                continue
            found.append(
                ArtifactInfo(
                    name=name,
                    verification="verified",
                    quantization=manifest.quantization,
                    size_bytes=manifest.size_bytes,
                    sha256=manifest.sha256,
                    accuracy_change_points=manifest.parity.accuracy_change_points,
                )
            )
        return ArtifactList(version=version, artifacts=found)

    async def send(request: Request, version: str, name: str, part: str) -> Response:
        audit_fields(request, model_version=version, note=f"artifact {name} {part}")
        try:
            files = await run_in_threadpool(verified, version, name)
        except HTTPException as exc:
            if exc.status_code == 409:
                audit_fields(request, reason=reasons.REFUSED)
            raise
        media_type, index = _FILES[part]
        return Response(files[index], media_type=media_type)

    artifact_errors = {**errors, 409: {"description": "the artifact fails verification"}}
    version_path = Annotated[str, Path(pattern=VERSION_PATTERN)]
    name_path = Annotated[str, Path(pattern=_NAME)]

    @app.get("/v1/models/{version}/artifacts/{name}", responses=artifact_errors)
    async def model_file(
        request: Request, version: version_path, name: name_path, _: Annotated[Principal, may]
    ) -> Response:
        """The artifact's model file (ONNX), verified first (device, admin)."""
        return await send(request, version, name, "model")

    @app.get("/v1/models/{version}/artifacts/{name}/manifest", responses=artifact_errors)
    async def manifest_file(
        request: Request, version: version_path, name: name_path, _: Annotated[Principal, may]
    ) -> Response:
        """The artifact's signed manifest, the exact bytes signed (device, admin)."""
        return await send(request, version, name, "manifest")

    @app.get("/v1/models/{version}/artifacts/{name}/signature", responses=artifact_errors)
    async def signature_file(
        request: Request, version: version_path, name: name_path, _: Annotated[Principal, may]
    ) -> Response:
        """The manifest's Ed25519 signature, hex (device, admin)."""
        return await send(request, version, name, "signature")
