"""A signed edge artifact: the model file, its manifest, and the manifest's signature.

Layout, next to the version's own files::

    versions/<version>/edge/<name>.onnx    the model (name: ``onnx`` or ``onnx-int8``)
    versions/<version>/edge/<name>.json    its manifest: SHA-256, version, format, parity
    versions/<version>/edge/<name>.sig     Ed25519 over the manifest's exact bytes (hex)

The signature is made exactly as a version's ``manifest.sig`` (``fedaiot.registry.signing``),
and the manifest holds the artifact's SHA-256, so one signature covers the model file too. A
device checks, in this order: the signature, that the manifest names the version and artifact
it asked for, and the file's SHA-256 and size; only then does it load the bytes it hashed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedaiot.errors import BadInputError, SecurityError
from fedaiot.registry import signing
from fedaiot.registry.files import replace

ARTIFACT_FORMAT: Literal["fedaiot-edge/1"] = "fedaiot-edge/1"
EDGE_DIR = "edge"
NAMES = ("onnx", "onnx-int8")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class ArtifactNotFoundError(BadInputError):
    """No such artifact for this version (it was never exported)."""


class ArtifactError(SecurityError):
    """An artifact whose signature, manifest, hash or size does not hold: refused."""


class Parity(BaseModel):
    """The artifact against the float torch model, on the evaluation set."""

    model_config = ConfigDict(extra="forbid")
    evaluation_set: str
    examples: int
    max_abs_probability_difference: float
    label_agreement: float
    accuracy_torch: float
    accuracy_artifact: float
    accuracy_change_points: float  # (artifact - torch) x 100


class ArtifactManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["fedaiot-edge/1"] = ARTIFACT_FORMAT
    name: str
    version: str
    task: str
    model_format: Literal["onnx"] = "onnx"
    quantization: Literal["none", "int8"]
    file: str
    sha256: str
    size_bytes: int
    # The version's weights this was exported from (its manifest's hash), and sizes to compare.
    model_weights_sha256: str
    reference_sizes: dict[str, int] = Field(default_factory=dict)
    input_name: str = "input"
    input_shape: list[int]
    standardized_inside: bool  # the graph applies the manifest's normalization itself
    output_name: str = "probabilities"
    class_names: list[str]
    opset: int
    parity: Parity
    tools: dict[str, str] = Field(default_factory=dict)
    created: float


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInputError(f"invalid artifact name {name!r}: one of {', '.join(NAMES)}")
    return name


def edge_dir(version_dir: Path) -> Path:
    return Path(version_dir) / EDGE_DIR


def paths(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """The model file, its manifest and its signature."""
    check_name(name)
    return folder / f"{name}.onnx", folder / f"{name}.json", folder / f"{name}.sig"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(
    folder: Path, manifest: ArtifactManifest, data: bytes, key: Ed25519PrivateKey
) -> Path:
    """Write the model, its manifest and the signature; an earlier export of the same name is
    replaced. The signature goes last: a reader between two renames sees a mismatch and
    refuses, never a wrong model that verifies."""
    model_path, manifest_path, signature_path = paths(folder, manifest.name)
    if manifest.sha256 != sha256(data) or manifest.size_bytes != len(data):
        raise ArtifactError(f"artifact {manifest.name}: the manifest does not describe these bytes")
    folder.mkdir(parents=True, exist_ok=True)
    manifest_bytes = manifest.model_dump_json(indent=2).encode()
    for path, content in (
        (model_path, data),
        (manifest_path, manifest_bytes),
        (signature_path, signing.sign(key, manifest_bytes).encode()),
    ):
        replace(path, content)
    return model_path


def read_signed(folder: Path, name: str) -> tuple[bytes, bytes, bytes]:
    """The raw model bytes, manifest bytes and signature bytes of an artifact, unverified."""
    found = paths(folder, name)
    if not found[1].is_file():
        raise ArtifactNotFoundError(f"no {name} artifact for this version (run fedaiot export)")
    try:
        model, manifest, signature = (path.read_bytes() for path in found)
    except FileNotFoundError as exc:
        raise ArtifactError(f"artifact {name}: {Path(exc.filename).name} is missing") from None
    return model, manifest, signature


def verify_bytes(
    model: bytes,
    manifest_bytes: bytes,
    signature: bytes,
    key: Ed25519PublicKey,
    *,
    version: str,
    name: str,
) -> ArtifactManifest:
    """The artifact's manifest once everything holds; ArtifactError naming the first check
    that fails."""
    try:
        signing.verify(key, manifest_bytes, signature.decode("ascii", errors="replace"))
    except signing.SigningError as exc:
        raise ArtifactError(f"artifact {name} of {version}: bad signature: {exc}") from None
    try:
        manifest = ArtifactManifest.model_validate_json(manifest_bytes)
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ArtifactError(f"artifact {name} of {version}: unreadable manifest: {first}") from None
    if manifest.version != version or manifest.name != name:
        raise ArtifactError(
            f"artifact {name} of {version}: its signed manifest is for {manifest.name} of "
            f"{manifest.version}"
        )
    actual = sha256(model)
    if actual != manifest.sha256 or len(model) != manifest.size_bytes:
        raise ArtifactError(
            f"artifact {name} of {version}: hash mismatch (manifest {manifest.sha256[:12]}, "
            f"file {actual[:12]}): the file is corrupt or tampered"
        )
    return manifest


def verify_artifact(
    folder: Path, name: str, key: Ed25519PublicKey, version: str
) -> tuple[ArtifactManifest, bytes]:
    """Read and verify an artifact: its manifest and the very bytes that were hashed."""
    model, manifest_bytes, signature = read_signed(folder, name)
    manifest = verify_bytes(model, manifest_bytes, signature, key, version=version, name=name)
    return manifest, model


def exported(folder: Path) -> list[str]:
    """The names of the artifacts a version's edge folder holds (by their manifests)."""
    if not folder.is_dir():
        return []
    names = (p.name.removesuffix(".json") for p in folder.glob("*.json"))
    return sorted(name for name in names if _NAME.match(name))
