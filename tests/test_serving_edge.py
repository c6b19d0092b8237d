"""Edge artifacts through the service (device role), and the service running an artifact
(``--runtime onnx``), over HTTP against a real uvicorn server on loopback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest

from fedaiot.edge.artifact import edge_dir
from fedaiot.edge.build import export_version
from fedaiot.edge.parity import evaluation_set
from fedaiot.registry.store import ModelRegistry
from fedaiot.serving import ServingStartupError, create_app
from fedaiot.tasks import get_task
from tests.edge_support import SEED, trained_registry
from tests.serving_support import Keys, LiveServer, ServeProcess, auth, make_keys, settings_for

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "examples" / "edge_verify_and_run.py"


def _snippet_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edge_verify_and_run", SNIPPET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> tuple[ModelRegistry, str]:
    """A trained breast-cancer version with both artifacts, and a second version without."""
    root = tmp_path_factory.mktemp("registry")
    registry, version = trained_registry(root, keys.private, "breast-cancer", 20)
    for quantization in ("int8", "none"):
        export_version(registry.root, version, keys.private, quantization)
    trained_registry(root, keys.private, "breast-cancer", 1, run="bare")  # no artifacts
    registry.set_refs(latest=version, best=version)
    return registry, version


@pytest.fixture
def registry(tmp_path: Path, source: tuple[ModelRegistry, str]) -> tuple[ModelRegistry, str]:
    """A copy that a test may tamper with."""
    shutil.copytree(source[0].root, tmp_path / "registry")
    return ModelRegistry(tmp_path / "registry"), source[1]


@pytest.fixture
def server(registry, keys: Keys) -> Iterator[LiveServer]:
    live = LiveServer(settings_for(registry[0].root, keys))
    yield live
    live.stop()


def _rows(count: int) -> np.ndarray:
    return evaluation_set(get_task("breast-cancer"), SEED)[0].x[:count]


def test_a_device_fetches_verifies_and_runs_the_artifact(server, registry, keys) -> None:
    _, version = registry
    base = f"{server.url}/v1/models/{version}/artifacts"
    device = auth(keys, "device")
    listing = httpx.get(base, headers=device).json()
    names = {a["name"]: a for a in listing["artifacts"]}
    assert set(names) == {"onnx", "onnx-int8"}
    assert names["onnx-int8"]["verification"] == "verified"
    assert names["onnx-int8"]["size_bytes"] < names["onnx"]["size_bytes"]
    files = [
        httpx.get(f"{base}/onnx-int8{suffix}", headers=device)
        for suffix in ("", "/manifest", "/signature")
    ]
    assert [f.status_code for f in files] == [200, 200, 200]
    assert files[0].headers["content-type"] == "application/octet-stream"
    snippet = _snippet_module()
    key = snippet.load_key(keys.public_path)
    manifest = snippet.verify(*(f.content for f in files), key, version, "onnx-int8")
    predictions = snippet.run(files[0].content, manifest, _rows(3).tolist())
    clinician = httpx.post(
        f"{server.url}/v1/predict", json={"instances": _rows(3).tolist()},
        headers=auth(keys, "clinician"),
    ).json()["predictions"]  # fmt: skip
    assert [p["label"] for p in predictions] == [p["label"] for p in clinician]


@pytest.mark.parametrize(("role", "status"), [("clinician", 403), ("auditor", 403), ("admin", 200)])
def test_only_devices_and_admins_download_artifacts(server, registry, keys, role, status) -> None:
    url = f"{server.url}/v1/models/{registry[1]}/artifacts/onnx-int8"
    assert httpx.get(url, headers=auth(keys, role)).status_code == status
    assert httpx.get(url).status_code == 401


def test_unknown_versions_and_artifacts_are_404(server, registry, keys) -> None:
    device = auth(keys, "device")
    assert (
        httpx.get(f"{server.url}/v1/models/nope-r0001/artifacts", headers=device).status_code == 404
    )
    url = f"{server.url}/v1/models/{registry[1]}/artifacts/onnx-int4"
    assert httpx.get(url, headers=device).status_code == 404
    url = f"{server.url}/v1/models/bare-r0001/artifacts"
    assert httpx.get(url, headers=device).json()["artifacts"] == []


def test_a_tampered_artifact_is_refused_by_the_service_and_by_the_snippet(
    server, registry, keys, tmp_path
) -> None:
    reg, version = registry
    model = edge_dir(reg.root / "versions" / version) / "onnx-int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0x01
    model.write_bytes(bytes(data))
    device = auth(keys, "device")
    base = f"{server.url}/v1/models/{version}/artifacts"
    refused = httpx.get(f"{base}/onnx-int8", headers=device)
    assert refused.status_code == 409 and "hash mismatch" in refused.json()["detail"]
    listing = {
        a["name"]: a["verification"] for a in httpx.get(base, headers=device).json()["artifacts"]
    }
    assert listing == {"onnx": "verified", "onnx-int8": "refused"}
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(_rows(2).tolist()))
    token = device["Authorization"].removeprefix("Bearer ")
    args = ["--public-key", str(keys.public_path), "--version", version, "--url", server.url,
            "--token", token, "--input", str(rows)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(SNIPPET), *args, "--artifact", "onnx-int8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("refused: the service answered 409")
    done = subprocess.run(
        [sys.executable, str(SNIPPET), *args, "--artifact", "onnx"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 2


def test_the_service_runs_the_int8_artifact(registry, keys) -> None:
    reg = registry[0]
    rows = _rows(40).tolist()
    answers = {}
    for runtime in ("onnx", "torch"):  # torch last: its promote changes the served ref
        live = LiveServer(settings_for(reg.root, keys, runtime=runtime))
        try:
            assert (
                live.app.state.holder.current.runtime
                == {"torch": "torch", "onnx": "onnx-int8"}[runtime]
            )
            response = httpx.post(
                f"{live.url}/v1/predict", json={"instances": rows}, headers=auth(keys, "clinician")
            )
            assert response.status_code == 200, response.text
            answers[runtime] = response.json()["predictions"]
            # A version without an artifact cannot be promoted under the onnx runtime.
            promote = httpx.post(
                f"{live.url}/v1/models/bare-r0001/promote", headers=auth(keys, "admin")
            )
            assert promote.status_code == (409 if runtime == "onnx" else 200)
            if runtime == "onnx":
                assert "no onnx-int8 artifact" in promote.json()["detail"]
        finally:
            live.stop()
    labels = {r: [p["label"] for p in answers[r]] for r in answers}
    assert labels["onnx"] == labels["torch"]
    for a, b in zip(answers["onnx"], answers["torch"], strict=True):
        for name, p in a["probabilities"].items():
            assert abs(p - b["probabilities"][name]) <= 0.05  # int8, rounded to 2 decimals


def test_a_tampered_or_missing_artifact_stops_an_onnx_service_at_startup(registry, keys) -> None:
    reg, version = registry
    reg.set_refs(served="bare-r0001")
    with pytest.raises(ServingStartupError, match="no onnx-int8 artifact"):
        create_app(settings_for(reg.root, keys, runtime="onnx"))
    reg.set_refs(served=version)
    manifest = edge_dir(reg.root / "versions" / version) / "onnx.json"
    manifest.write_text(manifest.read_text().replace('"task"', '"task" ', 1))
    with pytest.raises(ServingStartupError, match="bad signature"):
        create_app(settings_for(reg.root, keys, runtime="onnx", onnx_artifact="onnx"))


def test_fedaiot_serve_runtime_onnx(registry, keys) -> None:
    reg, _ = registry
    process = ServeProcess(reg.root, keys, runtime="onnx")
    try:
        response = httpx.post(
            f"{process.url}/v1/predict", json={"instances": _rows(1).tolist()},
            headers=auth(keys, "device"), timeout=30,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert set(response.json()["predictions"][0]) == {"label", "class_index"}
    finally:
        err = process.stop()
    assert "(onnx-int8)" in err
