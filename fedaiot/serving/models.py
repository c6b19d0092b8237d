"""Loading a signed model version for serving: with torch, or as its signed ONNX artifact.

``load_model`` checks, before anything is built: the manifest's Ed25519 signature, then the
weights' SHA-256 against the signed manifest (``ModelRegistry.load``), then that the task's
architecture and input shape match the manifest, then ``load_state_dict(strict=True)`` and one
forward pass on zeros. Weights are safetensors: no pickle anywhere on this path.

With the ONNX runtime (``Runtime("onnx", "onnx-int8")``) the version's manifest is verified the
same way, then the artifact's own signed manifest and the artifact's SHA-256
(``fedaiot.edge.artifact``); the artifact must have been exported from these very weights, and
onnxruntime is given the bytes that were hashed. Either way a request sees the same
``LoadedModel``: raw inputs in, probabilities out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedaiot.edge.artifact import (
    ArtifactError,
    ArtifactManifest,
    ArtifactNotFoundError,
    edge_dir,
    verify_artifact,
)
from fedaiot.registry.store import Manifest, ModelRegistry, RegistryError
from fedaiot.studies.encoding import Encoder, Statistics
from fedaiot.studies.spec import Study
from fedaiot.studies.task import PREFIX as STUDY_PREFIX
from fedaiot.studies.task import study_task
from fedaiot.tasks import Task, UnknownTaskError, get_task
from fedaiot.tasks.histogram import bin_counts, reference_frequencies

Runner = Callable[[np.ndarray], np.ndarray]  # a raw (n, *shape) float32 batch -> probabilities


class ModelLoadError(RegistryError):
    """A version that cannot be served: unsigned, tampered, corrupt or inconsistent."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """What runs a version: its torch weights, or one of its signed ONNX artifacts."""

    kind: Literal["torch", "onnx"] = "torch"
    artifact: str = "onnx-int8"
    threads: int = 1

    def describe(self) -> str:
        return "torch" if self.kind == "torch" else self.artifact


TORCH = Runtime()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    version: str
    manifest: Manifest
    module: torch.nn.Module | None  # the torch runtime's model; None under onnx
    shape: tuple[int, ...]
    size: int  # values per instance
    feature_names: list[str] | None
    class_names: list[str]
    mean: np.ndarray | None  # broadcastable against (n, *shape)
    std: np.ndarray | None
    runner: Runner | None = None  # raw inputs -> probabilities (the onnx runtime)
    runtime: str = "torch"
    # The training distribution of each feature over the drift bins (fedaiot.tasks.histogram);
    # None for a model without standardization statistics.
    reference: np.ndarray | None = None
    encoder: Encoder | None = None  # a study model's: objects of its features -> inputs

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of a raw (n, *shape) float32 batch, after the manifest's scaling."""
        if self.runner is not None:
            return self.runner(x)  # the artifact standardizes inside its graph
        assert self.module is not None
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return torch.softmax(logits.float(), dim=1).numpy()

    def drift_counts(self, x: np.ndarray) -> np.ndarray | None:
        """Counts per feature and drift bin of a raw batch (never the values themselves)."""
        if self.mean is None or self.std is None:
            return None
        return bin_counts((x - self.mean) / self.std)


@dataclass(frozen=True, slots=True)
class _Schema:
    task: Task
    shape: tuple[int, ...]
    feature_names: list[str] | None
    class_names: list[str]
    mean: np.ndarray | None
    std: np.ndarray | None
    reference: np.ndarray | None
    encoder: Encoder | None


def load_model(
    registry: ModelRegistry,
    version: str,
    public_key: Ed25519PublicKey,
    runtime: Runtime = TORCH,
) -> LoadedModel:
    """Verify and build a version; ModelLoadError says why a version cannot be served."""
    try:
        if runtime.kind == "onnx":
            manifest = registry.verify(version, public_key)
            folder = edge_dir(registry.root / "versions" / version)
            artifact, data = verify_artifact(folder, runtime.artifact, public_key, version)
            return _build_onnx(version, manifest, artifact, data, runtime)
        state, manifest = registry.load(version, public_key)
        return _build(version, manifest, state)
    except ModelLoadError:
        raise
    except (RegistryError, ArtifactError, ArtifactNotFoundError) as exc:
        raise ModelLoadError(str(exc)) from None
    except (UnknownTaskError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"model version {version} cannot be served: {message}") from None


def _task(manifest: Manifest) -> tuple[Task, Encoder | None]:
    """The manifest's task: a built-in one by name, a study's from the study it carries."""
    if not manifest.task.startswith(STUDY_PREFIX):
        return get_task(manifest.task), None
    schema = manifest.input_schema
    study = Study.model_validate(schema["study"])
    statistics = Statistics.model_validate(schema["statistics"])
    return study_task(study), Encoder(study, statistics)


def _schema(manifest: Manifest) -> _Schema:
    task, encoder = _task(manifest)
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
    mean = std = reference = None
    normalization = schema.get("normalization") or {}
    if normalization:
        view = (1, -1) + (1,) * (len(shape) - 1)  # per feature / channel: the batch's axis 1
        mean = np.asarray(normalization["mean"], dtype=np.float32).reshape(view)
        std = np.asarray(normalization["std"], dtype=np.float32).reshape(view)
        if mean.size != shape[0] or std.size != shape[0]:
            raise ValueError(f"normalization has {mean.size} means for {shape[0]} features")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("normalization statistics are not finite and positive")
        reference = reference_frequencies(schema, shape[0])
    class_names = [str(c) for c in schema.get("class_names") or task.class_names]
    names = [str(n) for n in names] if names is not None else None
    return _Schema(task, shape, names, class_names, mean, std, reference, encoder)


def _assemble(
    version: str,
    manifest: Manifest,
    schema: _Schema,
    module: torch.nn.Module | None,
    runner: Runner | None = None,
    runtime: str = "torch",
) -> LoadedModel:
    model = LoadedModel(
        version=version,
        manifest=manifest,
        shape=schema.shape,
        size=math.prod(schema.shape),
        feature_names=schema.feature_names,
        class_names=schema.class_names,
        mean=schema.mean,
        std=schema.std,
        reference=schema.reference,
        encoder=schema.encoder,
        module=module,
        runner=runner,
        runtime=runtime,
    )
    probe = model.predict_proba(np.zeros((1, *schema.shape), dtype=np.float32))
    if probe.shape != (1, len(schema.class_names)) or not np.isfinite(probe).all():
        raise ValueError(
            f"a forward pass gives {tuple(probe.shape)}, not 1 x {len(schema.class_names)}"
        )
    return model


def _build(version: str, manifest: Manifest, state: dict[str, torch.Tensor]) -> LoadedModel:
    schema = _schema(manifest)
    module = schema.task.build_model()
    module.load_state_dict(state, strict=True)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return _assemble(version, manifest, schema, module)


def _build_onnx(
    version: str, manifest: Manifest, artifact: ArtifactManifest, data: bytes, runtime: Runtime
) -> LoadedModel:
    from fedaiot.edge.runtime import OnnxRunner

    schema = _schema(manifest)
    if artifact.model_weights_sha256 != manifest.weights_sha256:
        raise ValueError(f"artifact {artifact.name} was exported from other weights")
    if tuple(artifact.input_shape) != schema.shape or artifact.class_names != schema.class_names:
        raise ValueError(f"artifact {artifact.name} does not take this version's input schema")
    if artifact.standardized_inside != (schema.mean is not None):
        raise ValueError(f"artifact {artifact.name} does not standardize as the manifest says")
    runner = OnnxRunner(data, runtime.threads, artifact.input_name)
    return _assemble(version, manifest, schema, None, runner, runtime.describe())
