"""The model registry: one folder per global-model version, safetensors weights + JSON manifest.

Layout::

    registry/
      refs.json                     {"latest": "<version>", "best": "<version>"}
      versions/<version>/model.safetensors
      versions/<version>/manifest.json

A version is written into a temporary folder and renamed into place, so a reader never sees
half of one, and an existing version is never overwritten. Loading checks the manifest's
SHA-256 of the weights file before anything is deserialised; safetensors holds tensors only, so
no code is ever unpickled from the registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST_FORMAT = "fedaiot-model/1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class RegistryError(RuntimeError):
    """A registry file is missing, corrupt, or does not match its manifest."""


class NodePrivacy(BaseModel):
    id: str
    examples: int | None  # None under secure aggregation: the count travels masked
    epsilon: float | None  # None for a non-private node
    delta: float
    noise_multiplier: float
    rounds: int  # rounds whose update entered the global model


class Manifest(BaseModel):
    format: str = MANIFEST_FORMAT
    version: str
    run: str
    task: str
    architecture: str
    input_schema: dict[str, Any]
    round: int
    metrics: dict[str, float]
    nodes: list[NodePrivacy] = Field(default_factory=list)
    config: dict[str, Any]
    weights_sha256: str
    created: float


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_name(run: str, round_number: int) -> str:
    return f"{run}-r{round_number:04d}"


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise RegistryError(f"invalid model version name {version!r}")
        return self.root / "versions" / version

    def register(self, state: Mapping[str, torch.Tensor], manifest: Manifest) -> Manifest:
        """Write weights and manifest (its hash filled in) as a new version."""
        final = self._dir(manifest.version)
        if final.exists():
            raise RegistryError(f"model version {manifest.version} already exists in {self.root}")
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root / "versions"))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(tensors, str(staging / WEIGHTS))
            manifest = manifest.model_copy(
                update={"weights_sha256": sha256_file(staging / WEIGHTS)}
            )
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def manifest(self, version: str) -> Manifest:
        path = self._dir(version) / MANIFEST
        if not path.exists():
            raise RegistryError(f"model version {version} not found in {self.root}")
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except (ValidationError, ValueError) as exc:
            raise RegistryError(f"corrupt manifest {path}: {str(exc).splitlines()[0]}") from None

    def load(self, version: str) -> tuple[dict[str, torch.Tensor], Manifest]:
        """Weights and manifest of a version, after checking the weights against their hash."""
        manifest = self.manifest(version)
        weights = self._dir(version) / WEIGHTS
        if not weights.exists():
            raise RegistryError(f"model version {version}: weights file {weights} is missing")
        actual = sha256_file(weights)
        if actual != manifest.weights_sha256:
            raise RegistryError(
                f"model version {version}: weights hash mismatch (manifest "
                f"{manifest.weights_sha256[:12]}, file {actual[:12]}): file corrupt or tampered"
            )
        try:
            return load_file(str(weights)), manifest
        except (SafetensorError, OSError) as exc:
            raise RegistryError(f"model version {version}: unreadable weights: {exc}") from None

    def versions(self, run: str | None = None) -> list[str]:
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        names = sorted(
            p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        return [n for n in names if run is None or n.rsplit("-r", 1)[0] == run]

    def refs(self) -> dict[str, str]:
        path = self.root / "refs.json"
        if not path.exists():
            return {}
        try:
            refs = json.loads(path.read_text())
        except ValueError as exc:
            raise RegistryError(f"corrupt registry refs {path}: {exc}") from None
        if not isinstance(refs, dict) or not all(isinstance(v, str) for v in refs.values()):
            raise RegistryError(f"corrupt registry refs {path}: expected a name -> version map")
        return refs

    def set_refs(self, **refs: str) -> None:
        for version in refs.values():
            self.manifest(version)  # refuse a ref to a missing or corrupt version
        merged = {**self.refs(), **refs}
        tmp = self.root / f".refs.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(merged, indent=2, sort_keys=True))
        os.replace(tmp, self.root / "refs.json")
