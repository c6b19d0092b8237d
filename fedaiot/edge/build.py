"""``fedaiot export``: a verified registry version to a signed ONNX artifact with its parity.

Steps: verify the version (its manifest's signature with the key's public half, then its
weights' hash), build the torch model, export the float graph (standardization inside), int8
it if asked, run both the torch model and the artifact (onnxruntime, from the artifact's bytes)
on the evaluation set, and write the artifact, its manifest and the signature.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save as save_safetensors

from fedaiot.edge.artifact import ArtifactManifest, edge_dir, sha256, write_artifact
from fedaiot.edge.export import INPUT, OPSET, OUTPUT, Standardized, quantize_int8, to_onnx
from fedaiot.edge.parity import compare, evaluation_set
from fedaiot.edge.runtime import OnnxRunner
from fedaiot.errors import BadInputError
from fedaiot.registry.store import Manifest, ModelRegistry
from fedaiot.tasks import get_task

Quantization = Literal["none", "int8"]
_BATCH = 1024


def artifact_name(quantization: Quantization) -> str:
    return "onnx" if quantization == "none" else f"onnx-{quantization}"


def standardized_module(manifest: Manifest, state: dict[str, torch.Tensor]) -> Standardized:
    """The version's torch model behind its manifest's standardization, in eval mode."""
    task = get_task(manifest.task)
    if manifest.architecture != task.architecture:
        raise BadInputError(
            f"model version {manifest.version}: architecture {manifest.architecture!r} is not "
            f"task {task.name}'s ({task.architecture!r})"
        )
    model = task.build_model()
    model.load_state_dict(state, strict=True)
    normalization = manifest.input_schema.get("normalization") or {}
    mean = np.asarray(normalization["mean"], dtype=np.float32) if normalization else None
    std = np.asarray(normalization["std"], dtype=np.float32) if normalization else None
    return Standardized(model, mean, std, len(task.input_shape)).eval()


def _torch_probabilities(module: Standardized, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        parts = [module(torch.from_numpy(x[i : i + _BATCH])) for i in range(0, len(x), _BATCH)]
    return torch.cat(parts).numpy()


def _runner_probabilities(runner: OnnxRunner, x: np.ndarray) -> np.ndarray:
    return np.concatenate([runner(x[i : i + _BATCH]) for i in range(0, len(x), _BATCH)])


def export_version(
    registry_root: Path, version: str, key: Ed25519PrivateKey, quantization: Quantization
) -> tuple[ArtifactManifest, Path]:
    """Export, compare and sign; the artifact's manifest and the model file's path."""
    registry = ModelRegistry(registry_root)
    state, manifest = registry.load(version, key.public_key())  # signature, then weights hash
    task = get_task(manifest.task)
    module = standardized_module(manifest, state)
    float_bytes = to_onnx(module, tuple(task.input_shape))
    data = float_bytes if quantization == "none" else quantize_int8(float_bytes)
    seed = int(manifest.config.get("seed", 42))
    test, described = evaluation_set(task, seed)
    parity = compare(
        _torch_probabilities(module, test.x),
        _runner_probabilities(OnnxRunner(data), test.x),
        test.y,
        described,
    )
    import onnx
    import onnxruntime

    name = artifact_name(quantization)
    artifact = ArtifactManifest(
        name=name,
        version=version,
        task=task.name,
        quantization=quantization,
        file=f"{name}.onnx",
        sha256=sha256(data),
        size_bytes=len(data),
        model_weights_sha256=manifest.weights_sha256,
        reference_sizes={
            "torch_safetensors": len(save_safetensors(module.model.state_dict())),
            "onnx_float": len(float_bytes),
        },
        input_name=INPUT,
        input_shape=[int(d) for d in task.input_shape],
        standardized_inside=module.scaled,
        output_name=OUTPUT,
        class_names=[str(c) for c in manifest.input_schema.get("class_names") or task.class_names],
        opset=OPSET,
        parity=parity,
        tools={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        created=time.time(),
    )
    folder = edge_dir(registry.root / "versions" / version)
    return artifact, write_artifact(folder, artifact, data, key)
