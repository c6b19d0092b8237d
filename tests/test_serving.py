"""The inference service, over HTTP against a real uvicorn server on a free loopback port."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedaiot.registry.store import ModelRegistry
from fedaiot.serving import ServingStartupError, create_app
from fedaiot.serving.auth import issue_token
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
    token,
)

MARKER = 4242.125  # a distinctive input value (a mean area) that must never reach the audit log


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[LiveServer]:
    """One server for the read-only tests."""
    root = tmp_path_factory.mktemp("registry")
    make_registry(root, keys.private)
    server = LiveServer(settings_for(root, keys))
    yield server
    server.stop()


@pytest.fixture
def fresh(tmp_path: Path, keys: Keys) -> Iterator[tuple[LiveServer, ModelRegistry]]:
    """A server of its own, for tests that promote, tamper or exhaust limits."""
    registry = make_registry(tmp_path / "registry", keys.private)
    limits = {"admin": RateLimit(per_second=10_000, burst=10_000)}
    server = LiveServer(settings_for(registry.root, keys, rate_limits=limits))
    yield server, registry
    server.stop()


def _predict_body(rows: int = 1) -> dict[str, Any]:
    return {"instances": [instance(0.1 * i) for i in range(rows)]}


ENDPOINTS: dict[str, tuple[str, str]] = {
    "predict": ("POST", "/v1/predict"),
    "model": ("GET", "/v1/model"),
    "models": ("GET", "/v1/models"),
    "audit": ("GET", "/v1/audit?limit=5"),
    "promote": ("POST", f"/v1/models/{V2}/promote"),  # V2 is served: a no-op for admin
    "rollback": ("POST", "/v1/models/rollback"),  # nothing to roll back to: 409 for admin
}
ALLOWED = {
    "clinician": {"predict"},
    "device": {"predict"},
    "auditor": {"model", "models", "audit"},
    "admin": set(ENDPOINTS),
}
OK = {name: 200 for name in ENDPOINTS} | {"rollback": 409}
MATRIX = [(role, name) for role in ALLOWED for name in ENDPOINTS]


def _call(server: LiveServer, name: str, headers: dict[str, str]) -> httpx.Response:
    method, path = ENDPOINTS[name]
    body = _predict_body() if name == "predict" else None
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(("role", "name"), MATRIX, ids=[f"{r}-{n}" for r, n in MATRIX])
def test_role_matrix(shared: LiveServer, keys: Keys, role: str, name: str) -> None:
    response = _call(shared, name, auth(keys, role, f"{role}-{name}"))
    if name in ALLOWED[role]:
        assert response.status_code == OK[name], response.text
    else:
        assert response.status_code == 403, response.text
        assert role in response.json()["detail"]
    if name == "predict" and response.status_code == 200:
        prediction = response.json()["predictions"][0]
        assert prediction["label"] in TASK.class_names
        assert ("probabilities" in prediction) == (role in ("clinician", "admin"))


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_no_token_is_401(shared: LiveServer, name: str) -> None:
    response = _call(shared, name, {})
    assert response.status_code == 401
    assert response.json()["detail"] == "missing bearer token"
    assert response.headers["www-authenticate"].startswith("Bearer")


def _other_key_token() -> str:
    return issue_token(
        Ed25519PrivateKey.generate(), subject="mallory", role="admin", ttl_seconds=60
    )


BAD_TOKENS = {
    "expired": (lambda k: token(k, "clinician", ttl=60, now=time.time() - 3600), "expired"),
    "forged": (lambda k: _other_key_token(), "signature invalid"),
    "malformed": (lambda k: "not-a-jwt", "malformed token"),
    "audience": (lambda k: token(k, "clinician", audience="elsewhere"), "audience"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_tokens_are_401_with_a_reason(shared: LiveServer, keys: Keys, kind: str) -> None:
    make, reason = BAD_TOKENS[kind]
    headers = {"Authorization": f"Bearer {make(keys)}"}
    response = _call(shared, "predict", headers)
    assert response.status_code == 401
    assert reason in response.json()["detail"]


NAMES = list(TASK.feature_names or [])
BAD_BODIES: dict[str, tuple[str, str]] = {
    "short-row": (json.dumps({"instances": [instance()[:29]]}), "wrong shape"),
    "nested": (json.dumps({"instances": [[instance()]]}), "wrong shape"),
    "unknown-feature": (
        json.dumps({"instances": [{**dict(zip(NAMES, instance(), strict=True)), "age": 3}]}),
        "1 unknown feature name(s)",
    ),
    "missing-feature": (
        json.dumps({"instances": [dict(zip(NAMES[1:], instance()[1:], strict=True))]}),
        "lacks the features ['mean radius']",
    ),
    "nan": ('{"instances": [[NaN' + ", 1.0" * 29 + "]]}", "is NaN"),
    "infinity": ('{"instances": [[1.0, -Infinity' + ", 1.0" * 28 + "]]}", "is infinite"),
    "too-large": (json.dumps({"instances": [instance()] * 257}), "batch too large: more than 256"),
    "empty": (json.dumps({"instances": []}), "empty"),
    "string": (json.dumps({"instances": [["1.0"] * 30]}), "valid number"),
    "no-instances": (json.dumps({"rows": []}), "takes one field, instances"),
}


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
def test_malformed_bodies_are_422_naming_the_problem(
    shared: LiveServer, keys: Keys, kind: str
) -> None:
    body, problem = BAD_BODIES[kind]
    headers = {**auth(keys, "clinician", f"body-{kind}"), "Content-Type": "application/json"}
    response = httpx.post(shared.url + "/v1/predict", content=body, headers=headers)
    assert response.status_code == 422, response.text
    messages = " | ".join(error["msg"] for error in response.json()["detail"])
    assert problem in messages
    assert '"input"' not in response.text  # the caller's data is not echoed back


def test_feature_name_objects_match_flat_rows(shared: LiveServer, keys: Keys) -> None:
    headers = auth(keys, "clinician", "objects")
    flat = httpx.post(shared.url + "/v1/predict", json=_predict_body(3), headers=headers)
    named = [dict(zip(NAMES, row, strict=True)) for row in _predict_body(3)["instances"]]
    by_name = httpx.post(shared.url + "/v1/predict", json={"instances": named}, headers=headers)
    assert flat.status_code == by_name.status_code == 200
    assert flat.json() == by_name.json()


def _served(server: LiveServer) -> str:
    return str(httpx.get(server.url + "/healthz").json()["model_version"])


def _promote(server: LiveServer, keys: Keys, version: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{version}/promote", headers=auth(keys, "admin"))


@pytest.mark.parametrize("damage", ["weights", "manifest", "signature", "unsigned"])
def test_damaged_version_is_refused_and_the_old_one_kept(
    fresh: tuple[LiveServer, ModelRegistry], keys: Keys, damage: str
) -> None:
    server, registry = fresh
    folder = registry.root / "versions" / V1
    if damage == "weights":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-3] ^= 0x01
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif damage == "manifest":  # still valid JSON, claims a better accuracy
        text = (folder / "manifest.json").read_text().replace('"accuracy": 0.9', '"accuracy": 0.99')
        (folder / "manifest.json").write_text(text)
    elif damage == "signature":
        (folder / "manifest.sig").write_text("00" * 64 + "\n")
    else:
        (folder / "manifest.sig").unlink()
    response = _promote(server, keys, V1)
    assert response.status_code == 409
    expected = {
        "weights": "hash mismatch",
        "manifest": "signature does not match",
        "signature": "signature does not match",
        "unsigned": "unsigned",
    }[damage]
    assert expected in response.json()["detail"]
    assert f"still serving {V2}" in response.json()["detail"]
    assert _served(server) == V2
    ok = httpx.post(server.url + "/v1/predict", json=_predict_body(), headers=auth(keys, "device"))
    assert ok.status_code == 200 and ok.json()["model_version"] == V2


def test_unsigned_registration_is_refused_at_startup(tmp_path: Path, keys: Keys) -> None:
    registry = ModelRegistry(tmp_path / "registry")  # no key: unsigned versions
    registry.register(model_state(1), make_manifest(1, 0.9))
    with pytest.raises(ServingStartupError, match="unsigned"):
        create_app(settings_for(registry.root, keys))


def test_registry_signs_with_the_environment_key(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDAIOT_SIGNING_KEY", str(keys.private_path))
    registry = ModelRegistry(tmp_path)
    registry.register(model_state(1), make_manifest(1, 0.9))
    signature = (tmp_path / "versions" / V1 / "manifest.sig").read_text()
    assert len(signature.strip()) == 128
    assert registry.verify(V1, keys.private.public_key()).version == V1
    weights, _ = registry.load(V1, keys.private.public_key())
    assert list(weights) == sorted(weights)  # load_file's order: the coordinator resumes on it


def test_promote_and_rollback_under_load_fail_no_request(
    fresh: tuple[LiveServer, ModelRegistry], keys: Keys
) -> None:
    server, registry = fresh
    stop = threading.Event()
    failures: list[str] = []
    seen: set[str] = set()
    counts = [0]

    def hammer() -> None:
        headers = auth(keys, "admin", "hammer")
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/predict", json=_predict_body(4))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                counts[0] += 1
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    seen.add(response.json()["model_version"])

    workers = [threading.Thread(target=hammer) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(5):
            time.sleep(0.05)
            assert _promote(server, keys, V1).json()["served"] == V1
            time.sleep(0.05)
            rollback = httpx.post(server.url + "/v1/models/rollback", headers=auth(keys, "admin"))
            assert rollback.json() == {"served": V2, "previous": V1}
        assert _promote(server, keys, V1).status_code == 200
        time.sleep(0.05)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    assert failures == []
    assert counts[0] > 20 and seen == {V1, V2}
    assert registry.refs()["served"] == V1
    assert json.loads((registry.root / "served.json").read_text())["history"] == [V2, V1]


def test_audit_rows_without_input_data(fresh: tuple[LiveServer, ModelRegistry], keys: Keys) -> None:
    server, registry = fresh
    marked = instance()
    marked[3] = MARKER
    body = {"instances": [marked, instance()]}
    assert httpx.post(
        server.url + "/v1/predict", json=body, headers=auth(keys, "clinician", "dr-a")
    )
    httpx.get(server.url + "/v1/model", headers=auth(keys, "device", "pump-7"))  # 403
    response = httpx.get(server.url + "/v1/audit?limit=10", headers=auth(keys, "auditor", "aud"))
    entries = response.json()["entries"]
    predict = next(e for e in entries if e["subject"] == "dr-a")
    assert predict["role"] == "clinician" and predict["endpoint"] == "/v1/predict"
    assert predict["rows"] == 2 and predict["status"] == 200 and predict["model_version"] == V2
    refused = next(e for e in entries if e["subject"] == "pump-7")
    assert refused["status"] == 403 and refused["role"] == "device"
    rows = sqlite3.connect(registry.root / "audit.sqlite3").execute("SELECT * FROM audit")
    dump = json.dumps(rows.fetchall())
    assert "4242" not in dump and str(instance()[0])[:6] not in dump


def test_metrics_expose_counters_without_auth(shared: LiveServer, keys: Keys) -> None:
    httpx.post(shared.url + "/v1/predict", json=_predict_body(), headers=auth(keys, "clinician"))
    text = httpx.get(shared.url + "/metrics").text
    assert 'fedaiot_requests_total{endpoint="/v1/predict",method="POST",status="200"}' in text
    assert "fedaiot_request_duration_seconds_bucket" in text
    assert f'fedaiot_served_model_info{{model_version="{V2}"}} 1.0' in text


def test_metrics_can_require_admin(tmp_path: Path, keys: Keys) -> None:
    registry = make_registry(tmp_path / "registry", keys.private)
    server = LiveServer(settings_for(registry.root, keys, metrics_auth="admin"))
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers=auth(keys, "auditor")).status_code == 403
        assert httpx.get(server.url + "/metrics", headers=auth(keys, "admin")).status_code == 200
    finally:
        server.stop()


def test_rate_limit_refuses_device_sooner_than_clinician(tmp_path: Path, keys: Keys) -> None:
    registry = make_registry(tmp_path / "registry", keys.private)
    limits = {
        "device": RateLimit(per_second=0.01, burst=3),
        "clinician": RateLimit(per_second=0.01, burst=10),
    }
    server = LiveServer(settings_for(registry.root, keys, rate_limits=limits))
    try:
        first_refusal = {}
        for role in ("device", "clinician"):
            headers = auth(keys, role)
            for i in range(12):
                response = httpx.post(
                    server.url + "/v1/predict", json=_predict_body(), headers=headers
                )
                if response.status_code == 429:
                    assert int(response.headers["retry-after"]) >= 1
                    first_refusal[role] = i
                    break
        assert first_refusal == {"device": 3, "clinician": 10}
    finally:
        server.stop()
