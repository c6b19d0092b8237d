"""Edge models: ONNX export, int8 quantization, the parity record, the signature, and the
device's verify-and-run snippet refusing a tampered artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedaiot.cli.main import app
from fedaiot.edge.artifact import ArtifactError, edge_dir, paths, verify_artifact
from fedaiot.edge.build import export_version, standardized_module
from fedaiot.edge.export import Standardized, quantize_int8, to_onnx
from fedaiot.edge.parity import evaluation_set
from fedaiot.errors import BadInputError
from fedaiot.registry.signing import generate_keypair, load_private_key
from fedaiot.registry.store import RegistryError
from fedaiot.tasks import get_task
from tests.edge_support import SEED, trained_registry

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "examples" / "edge_verify_and_run.py"
runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]):
    """A trained breast-cancer version exported as float and int8 ONNX."""
    key = load_private_key(keys[0])
    root = tmp_path_factory.mktemp("registry")
    registry, version = trained_registry(root, key, "breast-cancer", 20)
    manifests = {q: export_version(registry.root, version, key, q)[0] for q in ("none", "int8")}
    return registry, version, manifests


def test_int8_is_small_and_keeps_accuracy_and_probabilities(exported) -> None:
    manifests = exported[2]
    int8, plain = manifests["int8"], manifests["none"]
    assert (int8.name, int8.quantization, plain.name) == ("onnx-int8", "int8", "onnx")
    # The tabular acceptance bound: at most half the float model, either way it is measured.
    assert int8.size_bytes <= 0.5 * plain.size_bytes
    assert int8.size_bytes <= 0.5 * int8.reference_sizes["torch_safetensors"]
    assert int8.reference_sizes["onnx_float"] == plain.size_bytes
    parity = int8.parity
    assert parity.examples == 114  # breast-cancer's held-out 20 %
    assert abs(parity.accuracy_change_points) <= 1.0
    assert parity.accuracy_torch > 0.9  # a trained model, or the comparison says nothing
    assert 0 < parity.max_abs_probability_difference < 0.05
    assert plain.parity.max_abs_probability_difference < 1e-5  # float: the same function
    assert plain.parity.label_agreement == 1.0


def test_the_parity_record_matches_a_recomputation(exported, keys) -> None:
    """Run the verified artifact ourselves on the held-out set: the signed record holds."""
    import onnxruntime as ort

    registry, version, _ = exported
    manifest, data = verify_artifact(
        edge_dir(registry.root / "versions" / version), "onnx-int8",
        load_private_key(keys[0]).public_key(), version,
    )  # fmt: skip
    test, _ = evaluation_set(get_task("breast-cancer"), SEED)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"input": test.x})
    accuracy = float((probabilities.argmax(axis=1) == test.y).mean())
    assert accuracy == pytest.approx(manifest.parity.accuracy_artifact)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_a_tampered_artifact_or_manifest_is_refused_by_the_library(
    exported, keys, tmp_path
) -> None:
    import shutil

    registry, version, _ = exported
    folder = tmp_path / "edge"
    shutil.copytree(edge_dir(registry.root / "versions" / version), folder)
    public = load_private_key(keys[0]).public_key()
    model, manifest, _ = paths(folder, "onnx-int8")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash mismatch"):
        verify_artifact(folder, "onnx-int8", public, version)
    manifest.write_text(manifest.read_text().replace('"int8"', '"none"'))
    with pytest.raises(ArtifactError, match="bad signature"):
        verify_artifact(folder, "onnx-int8", public, version)
    with pytest.raises(ArtifactError, match="signed manifest is for onnx of"):
        (folder / "onnx-int8.json").write_bytes((folder / "onnx.json").read_bytes())
        (folder / "onnx-int8.sig").write_bytes((folder / "onnx.sig").read_bytes())
        verify_artifact(folder, "onnx-int8", public, version)


def _snippet(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SNIPPET), *args], capture_output=True, text=True, input=stdin,
        timeout=120,
    )  # fmt: skip


def test_the_snippet_runs_a_verified_artifact_and_refuses_a_tampered_one(
    exported, keys, tmp_path
) -> None:
    import shutil

    registry, version, _ = exported
    folder = tmp_path / "device"
    shutil.copytree(edge_dir(registry.root / "versions" / version), folder)
    test, _ = evaluation_set(get_task("breast-cancer"), SEED)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(test.x[:5].tolist()))
    common = ["--public-key", str(keys[1]), "--version", version, "--dir", str(folder)]
    done = _snippet(*common, "--artifact", "onnx-int8", "--input", str(rows))
    assert done.returncode == 0, done.stderr
    labels = [p["class_index"] for p in json.loads(done.stdout)["predictions"]]
    state, manifest = registry.load(version)
    with torch.inference_mode():
        reference = standardized_module(manifest, state)(torch.from_numpy(test.x[:5]))
    assert labels == reference.argmax(dim=1).tolist()  # the float torch model's labels

    model = folder / "onnx-int8.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0x40
    model.write_bytes(bytes(data))
    done = _snippet(*common, "--artifact", "onnx-int8", "--input", str(rows))
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: ") and "tampered" in lines[0]

    other = generate_keypair(tmp_path / "other")[1]
    done = _snippet("--public-key", str(other), "--version", version, "--dir", str(folder),
                    "--artifact", "onnx", "--input", str(rows))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "refused: the manifest's signature does not verify with the coordinator's key"
    )
    done = _snippet(*common[:2], "--version", "edge-r0009", "--dir", str(folder),
                    "--artifact", "onnx", "--input", str(rows))  # fmt: skip
    assert done.returncode == 1 and "not onnx of edge-r0009" in done.stderr


def test_export_command_prints_sizes_and_parity(exported, keys) -> None:
    registry, version, _ = exported
    args = ["export", str(registry.root), version, "--format", "onnx", "--quantize", "int8"]
    result = runner.invoke(app, [*args, "--key", str(keys[0])])
    assert result.exit_code == 0, result.output
    assert "of the float ONNX graph" in result.output
    assert "accuracy" in result.output and "points" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope-r0001"], "model version nope-r0001 not found"),
        (["VERSION", "--format", "tflite"], "'tflite' is not 'onnx'"),
        (["VERSION", "--quantize", "int4"], "'int4' is not one of"),
        (["VERSION", "--key", "/nonexistent/coordinator.key"], "not found"),
    ],
)
def test_export_command_names_bad_input(exported, keys, args: list[str], message: str) -> None:
    registry, version, _ = exported
    args = [version if a == "VERSION" else a for a in args]
    if "--key" not in args:
        args += ["--key", str(keys[0])]
    result = runner.invoke(app, ["export", str(registry.root), *args])
    assert result.exit_code == BadInputError.exit_code, result.output
    assert message in result.output


def test_export_refuses_a_version_not_signed_by_the_key(exported, tmp_path) -> None:
    registry, version, _ = exported
    stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
    with pytest.raises(RegistryError, match="bad manifest signature"):
        export_version(registry.root, version, stranger, "int8")


@pytest.mark.parametrize(
    ("task_name", "bound"),
    [
        ("fashion-mnist", 0.30),
        ("digits", 0.50),
        ("breast-cancer", 0.50),
        ("basic-motions", 0.30),
        ("acsf1", 0.30),
    ],
)
def test_int8_size_against_the_float_graph(task_name: str, bound: float) -> None:
    """Sizes do not depend on the weights' values: an untrained model measures them."""
    task = get_task(task_name)
    channels = task.input_shape[0]
    module = Standardized(
        task.build_model(), np.zeros(channels), np.ones(channels), len(task.input_shape)
    )
    float_bytes = to_onnx(module, tuple(task.input_shape))
    assert len(quantize_int8(float_bytes)) <= bound * len(float_bytes)
