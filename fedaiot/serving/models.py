"""Loading a signed model version, holding the served one, and validating prediction inputs.

``load_model`` checks, before anything is built: the manifest's Ed25519 signature, then the
weights' SHA-256 against the signed manifest (``ModelRegistry.load``), then that the task's
architecture and input shape match the manifest, then ``load_state_dict(strict=True)`` and one
forward pass on zeros. Weights are safetensors: no pickle anywhere on this path.

``ModelHolder`` keeps the served ``LoadedModel`` behind one reference. A swap (promote or
rollback) loads and verifies the new version completely first, then replaces the reference
under a lock; a request reads the reference once and keeps that object to the end, so requests
in flight finish on the old model and none fails. The served version is the registry ref
``served`` (refs.json); the history that rollback walks back is ``served.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedaiot.registry.store import Manifest, ModelRegistry, RegistryError
from fedaiot.studies.encoding import Encoder, Statistics
from fedaiot.studies.spec import Study
from fedaiot.studies.task import PREFIX as STUDY_PREFIX
from fedaiot.studies.task import study_task
from fedaiot.tasks import Task, UnknownTaskError, get_task

log = logging.getLogger(__name__)
HISTORY_FILE = "served.json"


class ModelLoadError(RegistryError):
    """A version that cannot be served: unsigned, tampered, corrupt or inconsistent."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    version: str
    manifest: Manifest
    module: torch.nn.Module
    shape: tuple[int, ...]
    size: int  # values per instance
    feature_names: list[str] | None
    class_names: list[str]
    mean: np.ndarray | None  # broadcastable against (n, *shape)
    std: np.ndarray | None
    encoder: Encoder | None = None  # a study model's: objects of its features -> inputs

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of a (n, *shape) float32 batch, after the manifest's scaling."""
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return torch.softmax(logits.float(), dim=1).numpy()


def load_model(registry: ModelRegistry, version: str, public_key: Ed25519PublicKey) -> LoadedModel:
    """Verify and build a version; ModelLoadError says why a version cannot be served."""
    try:
        state, manifest = registry.load(version, public_key)
    except ModelLoadError:
        raise
    except RegistryError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        return _build(version, manifest, state)
    except (UnknownTaskError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"model version {version} cannot be served: {message}") from None


def _study_task(manifest: Manifest) -> tuple[Task, Encoder | None]:
    """The manifest's task: a built-in one by name, a study's from the study it carries."""
    if not manifest.task.startswith(STUDY_PREFIX):
        return get_task(manifest.task), None
    schema = manifest.input_schema
    study = Study.model_validate(schema["study"])
    statistics = Statistics.model_validate(schema["statistics"])
    return study_task(study), Encoder(study, statistics)


def _build(version: str, manifest: Manifest, state: dict[str, torch.Tensor]) -> LoadedModel:
    task, encoder = _study_task(manifest)
    if manifest.architecture != task.architecture:
        raise ValueError(
            f"architecture {manifest.architecture!r} is not task {task.name}'s "
            f"({task.architecture!r})"
        )
    schema = manifest.input_schema
    shape = tuple(int(d) for d in schema["shape"])
    if shape != tuple(task.input_shape):
        raise ValueError(f"input shape {list(shape)} is not the task's {list(task.input_shape)}")
    names = schema.get("feature_names")
    if names is not None and len(names) != math.prod(shape):
        raise ValueError(f"{len(names)} feature names for {math.prod(shape)} input values")
    if encoder is not None:  # a caller names the study's features, not the encoded inputs
        names = [f.name for f in encoder.study.features]
    mean = std = None
    normalization = schema.get("normalization") or {}
    if normalization:
        view = (1, -1) + (1,) * (len(shape) - 1)  # per feature / channel: the batch's axis 1
        mean = np.asarray(normalization["mean"], dtype=np.float32).reshape(view)
        std = np.asarray(normalization["std"], dtype=np.float32).reshape(view)
        if mean.size != shape[0] or std.size != shape[0]:
            raise ValueError(f"normalization has {mean.size} means for {shape[0]} features")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("normalization statistics are not finite and positive")
    module = task.build_model()
    module.load_state_dict(state, strict=True)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    class_names = [str(c) for c in schema.get("class_names") or task.class_names]
    model = LoadedModel(
        version=version,
        manifest=manifest,
        module=module,
        shape=shape,
        size=math.prod(shape),
        feature_names=[str(n) for n in names] if names is not None else None,
        class_names=class_names,
        mean=mean,
        std=std,
        encoder=encoder,
    )
    probe = model.predict_proba(np.zeros((1, *shape), dtype=np.float32))
    if probe.shape != (1, len(class_names)) or not np.isfinite(probe).all():
        raise ValueError(f"a forward pass gives {tuple(probe.shape)}, not 1 x {len(class_names)}")
    return model


class ModelHolder:
    """The served model: read lock-free by requests, swapped atomically by admins."""

    def __init__(
        self, registry: ModelRegistry, public_key: Ed25519PublicKey, history_size: int = 20
    ) -> None:
        self.registry = registry
        self._key = public_key
        self._history_size = history_size
        self._swap = threading.Lock()
        self._current: LoadedModel | None = None

    @property
    def current(self) -> LoadedModel:
        model = self._current  # one read of the reference: the request keeps this object
        if model is None:
            raise RuntimeError("no model loaded")
        return model

    def start(self) -> LoadedModel:
        """Serve the ``served`` ref, else ``best``, else ``latest`` (else the newest version)."""
        refs = self.registry.refs()
        versions = self.registry.versions()
        version = refs.get("served") or refs.get("best") or refs.get("latest")
        if version is None:
            if not versions:
                raise ModelLoadError(f"no model version in the registry {self.registry.root}")
            version = versions[-1]
        with self._swap:
            model = load_model(self.registry, version, self._key)
            history = self.history()
            if not history or history[-1] != version:
                history.append(version)
            self._record(history)
            self._current = model
        return model

    def promote(self, version: str) -> tuple[str, str]:
        """Serve ``version``; returns (previous, new). The old model stays on any refusal."""
        with self._swap:
            old = self.current
            if version == old.version:
                return old.version, version
            model = load_model(self.registry, version, self._key)  # verified before the swap
            self._record([*self.history(), version])
            self._current = model
        return old.version, version

    def rollback(self) -> tuple[str, str]:
        """Serve the version served before the current one; returns (previous, new)."""
        with self._swap:
            old = self.current
            history = self.history()
            while history and history[-1] == old.version:
                history.pop()
            if not history:
                raise LookupError("no earlier served version to roll back to")
            model = load_model(self.registry, history[-1], self._key)
            self._record(history)
            self._current = model
        return old.version, model.version

    def history(self) -> list[str]:
        path = self.registry.root / HISTORY_FILE
        try:
            data: Any = json.loads(path.read_text())
            history = data["history"]
            if isinstance(history, list) and all(isinstance(v, str) for v in history):
                return history
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError):
            pass
        log.warning("ignoring the unreadable served-version history %s", path)
        return []

    def _record(self, history: list[str]) -> None:
        history = history[-self._history_size :]
        self.registry.set_refs(served=history[-1])
        path: Path = self.registry.root / HISTORY_FILE
        tmp = path.with_name(f".{HISTORY_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"history": history}, indent=2))
        os.replace(tmp, path)
