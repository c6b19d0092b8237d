"""The model registry: one folder per global-model version, safetensors weights + JSON manifest.

Layout::

    registry/
      refs.json                     {"latest": "<version>", "best": "<version>", ...}
      .refs.lock                    held while refs.json is rewritten
      versions/<version>/model.safetensors
      versions/<version>/manifest.json
      versions/<version>/manifest.sig   (when registered with a signing key)

A version is written into a temporary folder and renamed into place, so a reader never sees
half of one, and an existing version is never overwritten. Loading checks the manifest's
SHA-256 of the weights file before anything is deserialised; safetensors holds tensors only, so
no code is ever unpickled from the registry.

Signing: a registry given an Ed25519 private key (or, when none is given, the PEM file named by
``$FEDAIOT_SIGNING_KEY``) writes ``manifest.sig`` next to each manifest: the hex Ed25519
signature over the exact ``manifest.json`` bytes (see ``fedaiot.registry.signing``). The
manifest holds the weights' SHA-256, so the signature covers the weights too. ``verify`` and
``load(version, public_key)`` refuse an unsigned or wrongly signed version.

Refs are rewritten by several processes: the coordinator's rounds (``latest``, ``best``), a
campaign (``candidate``) and the service (``served``, on a promotion or a rollback). Each
rewrite reads, merges and replaces the file under an exclusive lock (``flock`` on
``.refs.lock``), so no writer drops another's ref.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fedaiot.errors import BadInputError
from fedaiot.registry import signing
from fedaiot.registry.files import exclusive, replace

MANIFEST_FORMAT = "fedaiot-model/1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


class RegistryError(BadInputError):
    """A registry file is missing, corrupt, or does not match its manifest."""


class NodePrivacy(BaseModel):
    id: str
    examples: int | None  # the weight it reported: a noisy count under DP; None when masked
    epsilon: float | None  # None for a non-private node
    delta: float
    noise_multiplier: float
    rounds: int  # rounds whose update entered the global model
    # distributed DP: the epsilon of the node's own noise share alone (every other node
    # colluding with the coordinator); ``epsilon`` holds under the run's trust assumption
    epsilon_local: float | None = None


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
    # what the nodes disclosed to the coordinator in the clear (fedaiot.privacy.disclosure)
    privacy: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str
    created: float
    # where the model came from when a campaign made it (fedaiot.campaigns): the campaign, the
    # version it continued from, its run's own registry; empty for a run's own versions
    lineage: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_name(run: str, round_number: int) -> str:
    return f"{run}-r{round_number:04d}"


class ModelRegistry:
    def __init__(self, root: Path, signing_key: Ed25519PrivateKey | None = None) -> None:
        """``signing_key`` signs every registered version; without one, the key file named by
        ``$FEDAIOT_SIGNING_KEY`` does (read at the first registration), if that is set."""
        self.root = Path(root)
        self._signing_key = signing_key

    def _signer(self) -> Ed25519PrivateKey | None:
        if self._signing_key is None and os.environ.get(signing.SIGNING_KEY_ENV):
            try:
                path = Path(os.environ[signing.SIGNING_KEY_ENV])
                self._signing_key = signing.load_private_key(path)
            except signing.SigningError as exc:
                raise RegistryError(f"${signing.SIGNING_KEY_ENV}: {exc}") from None
        return self._signing_key

    def _dir(self, version: str) -> Path:
        bad = not version or any(c in version for c in "/\\\0") or version.startswith(".")
        if bad:
            raise RegistryError(f"invalid model version name {version!r}")
        return self.root / "versions" / version

    def register(self, state: Mapping[str, torch.Tensor], manifest: Manifest) -> Manifest:
        """Write weights and manifest (its hash filled in) as a new version."""
        final = self._dir(manifest.version)
        key = self._signer()
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
            manifest_bytes = manifest.model_dump_json(indent=2).encode()
            (staging / MANIFEST).write_bytes(manifest_bytes)
            if key is not None:
                (staging / SIGNATURE).write_text(signing.sign(key, manifest_bytes))
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def _manifest_bytes(self, version: str) -> bytes:
        path = self._dir(version) / MANIFEST
        if not path.exists():
            raise RegistryError(f"model version {version} not found in {self.root}")
        return path.read_bytes()

    def _parse(self, version: str, data: bytes) -> Manifest:
        try:
            return Manifest.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            path = self._dir(version) / MANIFEST
            raise RegistryError(f"corrupt manifest {path}: {str(exc).splitlines()[0]}") from None

    def manifest(self, version: str) -> Manifest:
        return self._parse(version, self._manifest_bytes(version))

    def verify(self, version: str, public_key: Ed25519PublicKey) -> Manifest:
        """The version's manifest, parsed from the very bytes whose signature was checked."""
        data = self._manifest_bytes(version)
        sig = self._dir(version) / SIGNATURE
        if not sig.exists():
            raise RegistryError(f"model version {version} is unsigned (no {SIGNATURE})")
        try:
            signing.verify(public_key, data, sig.read_text(errors="replace"))
        except signing.SigningError as exc:
            raise RegistryError(f"model version {version}: bad manifest signature: {exc}") from None
        manifest = self._parse(version, data)
        if manifest.version != version:
            raise RegistryError(
                f"model version {version}: its signed manifest names version {manifest.version}"
            )
        return manifest

    def load(
        self, version: str, public_key: Ed25519PublicKey | None = None
    ) -> tuple[dict[str, torch.Tensor], Manifest]:
        """Weights and manifest of a version, after checking the weights against their hash
        (and, with ``public_key``, the manifest's signature first)."""
        manifest = (
            self.verify(version, public_key) if public_key is not None else self.manifest(version)
        )
        weights = self._dir(version) / WEIGHTS
        if not weights.exists():
            raise RegistryError(f"model version {version}: weights file {weights} is missing")
        data = weights.read_bytes()  # hashed and parsed from the same bytes
        actual = hashlib.sha256(data).hexdigest()
        if actual != manifest.weights_sha256:
            raise RegistryError(
                f"model version {version}: weights hash mismatch (manifest "
                f"{manifest.weights_sha256[:12]}, file {actual[:12]}): file corrupt or tampered"
            )
        try:
            tensors = load_safetensors(data)
            # In key order, as safetensors' load_file gives them (resuming relies on it).
            return {key: tensors[key] for key in sorted(tensors)}, manifest
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
        """Point each named ref at its version, keeping the other refs."""
        for version in refs.values():
            self.manifest(version)  # refuse a ref to a missing or corrupt version
        with exclusive(self.root / ".refs.lock"):
            merged = {**self.refs(), **refs}
            replace(self.root / "refs.json", json.dumps(merged, indent=2, sort_keys=True).encode())
