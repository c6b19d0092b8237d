"""What the service takes in and gives out: inputs outside the trained range, non-finite outputs,
no caller text echoed, no file paths in any response, verified metrics only, /docs off."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedaiot.registry.store import ModelRegistry
from fedaiot.serving.auth import Principal
from fedaiot.serving.inference import Predictor
from fedaiot.serving.inputs import InputError
from fedaiot.serving.limits import DailyQuota, RateLimiter
from fedaiot.serving.models import LoadedModel
from fedaiot.serving.settings import RateLimit
from tests.serving_support import (
    TASK,
    V1,
    V2,
    Keys,
    LiveServer,
    auth,
    instance,
    make_keys,
    make_manifest,
    make_registry,
    model_state,
    settings_for,
)

NAMES = list(TASK.feature_names or [])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def served(tmp_path: Path, keys: Keys) -> Iterator[tuple[LiveServer, ModelRegistry]]:
    registry = make_registry(tmp_path / "registry", keys.private)
    limits = {"admin": RateLimit(per_second=1000, burst=1000)}
    server = LiveServer(settings_for(registry.root, keys, rate_limits=limits))
    yield server, registry
    server.stop()


def _predict(
    server: LiveServer, keys: Keys, body: object, role: str = "clinician"
) -> httpx.Response:
    return httpx.post(server.url + "/v1/predict", json=body, headers=auth(keys, role))


@pytest.mark.parametrize("value", [3e38, -3e38, 1e30, 1e12])
def test_values_outside_the_trained_range_get_422(
    served: tuple[LiveServer, ModelRegistry], keys: Keys, value: float
) -> None:
    server, _ = served
    row = instance()
    row[2] = value
    for role in ("clinician", "device"):  # issue 11: 500 for clinicians, "malignant" for devices
        response = _predict(server, keys, {"instances": [instance(), row]}, role)
        assert response.status_code == 422, response.text
        message = response.json()["detail"][0]["msg"]
        assert "instance 1, feature 'mean perimeter' is outside the range" in message
        assert response.json()["detail"][0]["loc"] == ["body", "instances", 1]
    named = dict(zip(NAMES, row, strict=True))
    assert _predict(server, keys, {"instances": [named]}).status_code == 422
    assert _predict(server, keys, {"instances": [instance(50.0)]}).status_code == 200  # 50 sd


def _nan_model() -> LoadedModel:
    """A real linear model whose first logit overflows to inf when value 0 is not 0."""
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1e38, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        module.bias.zero_()
    manifest = make_manifest(1, 0.9)
    return LoadedModel(
        version="nan-r0001", manifest=manifest, module=module.eval(), shape=(3,), size=3,
        feature_names=None, class_names=["malignant", "benign"], mean=None, std=None,
    )  # fmt: skip


def test_a_non_finite_output_is_never_a_label(tmp_path: Path, keys: Keys) -> None:
    settings = settings_for(tmp_path, keys)
    predictor = Predictor(
        settings, RateLimiter(settings.rate_limits), DailyQuota(settings.rate_limits)
    )
    model = _nan_model()
    finite = json.dumps({"instances": [[0.0, 1.0, 2.0]]}).encode()
    overflow = json.dumps({"instances": [[0.0, 1.0, 2.0], [5.0, 1.0, 2.0]]}).encode()
    try:
        for role in ("clinician", "device"):
            principal = Principal(subject="s", role=role)
            ok = asyncio.run(predictor.predict(finite, model, principal))
            assert json.loads(ok.body)["predictions"][0]["label"] == "benign"
            with pytest.raises(InputError) as refused:
                asyncio.run(predictor.predict(overflow, model, principal))
            assert refused.value.reason == "no_finite_output"
            assert "instance 1: the model gives no finite output" in str(refused.value)
    finally:
        predictor.close()
    assert np.isnan(model.predict_proba(np.array([[5.0, 1.0, 2.0]], np.float32))).any()


def test_caller_text_is_not_echoed(served: tuple[LiveServer, ModelRegistry], keys: Keys) -> None:
    server, _ = served
    marker = "<script>alert(1)</script>"
    named = {**dict(zip(NAMES, instance(), strict=True)), marker: 1.0}
    bodies = [
        {"instances": [named]},
        {"instances": [[marker] * 30]},
        {marker: []},
        {"instances": [instance()], marker: 1},
    ]
    for body in bodies:
        response = _predict(server, keys, body)
        assert response.status_code == 422
        assert "script" not in response.text
    raw = httpx.post(
        server.url + "/v1/predict", content=b'{"instances": [' + marker.encode(),
        headers=auth(keys, "clinician"),
    )  # fmt: skip
    assert raw.status_code == 422 and "script" not in raw.text
    promote = httpx.post(
        server.url + "/v1/models/no-such-version/promote", headers=auth(keys, "admin")
    )
    assert promote.status_code == 404 and "no-such-version" not in promote.text


ABSOLUTE = re.compile(r"(^|[\s\"'(=])/(tmp|home|root|work|var|private)\b")


@pytest.mark.parametrize("damage", ["weights", "manifest", "signature", "unsigned"])
def test_no_paths_in_responses_and_only_verified_metrics(
    served: tuple[LiveServer, ModelRegistry], keys: Keys, damage: str
) -> None:
    server, registry = served
    folder = registry.root / "versions" / V1
    if damage == "weights":
        (folder / "model.safetensors").unlink()  # "weights file <path> is missing"
    elif damage == "manifest":
        text = (folder / "manifest.json").read_text().replace('"accuracy": 0.9', '"accuracy": 0.99')
        (folder / "manifest.json").write_text(text)
    elif damage == "signature":
        (folder / "manifest.sig").write_text("00" * 64 + "\n")
    else:
        (folder / "manifest.sig").unlink()
    admin = auth(keys, "admin")
    refused = httpx.post(f"{server.url}/v1/models/{V1}/promote", headers=admin)
    assert refused.status_code == 409 and f"still serving {V2}" in refused.text
    listing = httpx.get(server.url + "/v1/models", headers=admin).json()
    card = httpx.get(server.url + "/v1/model", headers=admin).text
    audit = httpx.get(server.url + "/v1/audit?limit=20", headers=admin).text
    for text in (refused.text, json.dumps(listing), card, audit):
        assert str(registry.root) not in text and not ABSOLUTE.search(text), text
    versions = {v["version"]: v for v in listing["versions"]}
    assert versions[V2]["verification"] == "verified" and versions[V2]["accuracy"] == 0.93
    expected = {"weights": "verified", "manifest": "bad-signature", "signature": "bad-signature"}
    assert versions[V1]["verification"] == expected.get(damage, "unsigned")
    if damage != "weights":  # the manifest's claims are not shown unless its signature holds
        assert versions[V1]["accuracy"] is None and versions[V1]["round"] is None


def test_the_model_card_names_no_paths(tmp_path: Path, keys: Keys) -> None:
    registry = ModelRegistry(tmp_path / "registry", signing_key=keys.private)
    manifest = make_manifest(1, 0.9)
    manifest.config.update(output_dir=str(tmp_path / "runs" / "bc"), data_path="~/data/bc.csv")
    registry.register(model_state(1), manifest)
    server = LiveServer(settings_for(registry.root, keys))
    try:
        card = httpx.get(server.url + "/v1/model", headers=auth(keys, "auditor")).json()
        assert card["training_config"] == {"task": TASK.name, "epsilon": 1.0, "num_rounds": 2}
    finally:
        server.stop()


def test_docs_are_off_unless_asked(served: tuple[LiveServer, ModelRegistry], keys: Keys) -> None:
    server, registry = served
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 404
    with_docs = LiveServer(settings_for(registry.root, keys, docs=True))
    try:
        schema = httpx.get(with_docs.url + "/openapi.json").json()
        body = schema["paths"]["/v1/predict"]["post"]["requestBody"]
        assert "instances" in json.dumps(body)
        assert httpx.get(with_docs.url + "/docs").status_code == 200
    finally:
        with_docs.stop()
