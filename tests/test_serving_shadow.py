"""Shadow scoring and gated promotion through the service, over HTTP against a real uvicorn
server on loopback: agreement counted from live traffic (never inputs), who may see and steer
it, a promotion's reason in the audit log, and the gate promoting or refusing a candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedaiot.registry.signing import load_public_key
from fedaiot.serving.models import load_model
from tests.serving_support import V1, V2, Keys, LiveServer, auth, make_keys, settings_for
from tests.test_serving_alerts import LIMITS, audit_rows, drift_registry, predict, real_rows
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def serve(tmp_path: Path, keys: Keys, rules: str | None = None) -> LiveServer:
    registry = drift_registry(tmp_path / "registry", keys)
    extra: dict[str, Any] = {}
    if rules is not None:
        (tmp_path / "alerts.yml").write_text(rules)
        extra["alert_rules"] = tmp_path / "alerts.yml"
    return LiveServer(settings_for(registry.root, keys, rate_limits=LIMITS, **extra))


def report(server: LiveServer, keys: Keys, version: str, role: str = "auditor") -> Any:
    return httpx.get(f"{server.url}/v1/models/{version}/shadow", headers=auth(keys, role))


def test_a_candidate_scores_live_traffic_and_its_agreement_is_counted(
    tmp_path: Path, keys: Keys
) -> None:
    server = serve(tmp_path, keys)
    admin = auth(keys, "admin")
    try:
        started = httpx.post(f"{server.url}/v1/models/{V1}/shadow", headers=admin)
        assert started.status_code == 200, started.text
        assert started.json()["active"] and started.json()["served"] == V2
        rows = real_rows(250)
        predict(server, keys, rows)
        counted = wait_until(
            lambda: (r := report(server, keys, V1).json())["rows"] == 250 and r,
            "the shadow thread to score every row",
        )
        registry = server.app.state.holder.registry
        key = load_public_key(keys.public_path)
        x = np.asarray(rows, dtype=np.float32)
        served = load_model(registry, V2, key).predict_proba(x).argmax(axis=1)
        candidate = load_model(registry, V1, key).predict_proba(x).argmax(axis=1)
        agreed = int((served == candidate).sum())
        assert counted["agreed"] == agreed
        assert counted["agreement"] == pytest.approx(agreed / 250)
        low, high = counted["agreement_interval"]
        assert low <= agreed / 250 <= high
        assert sum(counted["served_class_mix"].values()) == 250
        assert counted["by_served"][V2]["rows"] == 250 and counted["dropped_rows"] == 0
        # Callers still got the served version's answers.
        answer = httpx.post(
            f"{server.url}/v1/predict", json={"instances": rows[:1]},
            headers=auth(keys, "clinician"),
        )  # fmt: skip
        assert answer.json()["model_version"] == V2
        stopped = httpx.delete(f"{server.url}/v1/models/{V1}/shadow", headers=admin)
        assert stopped.status_code == 200 and not stopped.json()["active"]
        predict(server, keys, rows[:50])
        assert report(server, keys, V1).json()["rows"] <= 251  # no more scoring once stopped
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("method", "role", "status"),
    [
        ("GET", "auditor", 404), ("GET", "admin", 404), ("GET", "clinician", 403),
        ("GET", "device", 403), ("POST", "auditor", 403), ("POST", "clinician", 403),
        ("DELETE", "auditor", 403), ("DELETE", "admin", 404),
    ],
)  # fmt: skip
def test_who_may_read_and_steer_shadowing(
    tmp_path: Path, keys: Keys, method: str, role: str, status: int
) -> None:
    server = serve(tmp_path, keys)
    try:
        url = f"{server.url}/v1/models/{V1}/shadow"
        assert httpx.request(method, url, headers=auth(keys, role)).status_code == status
        assert httpx.request(method, url).status_code == 401
    finally:
        server.stop()


def test_a_restarted_service_keeps_the_shadow_reports_and_goes_on_counting(
    tmp_path: Path, keys: Keys
) -> None:
    """A shadow gathers evidence for days; a restart of the service must not throw it away."""
    server = serve(tmp_path, keys)
    admin = auth(keys, "admin")
    try:
        assert httpx.post(f"{server.url}/v1/models/{V1}/shadow", headers=admin).is_success
        predict(server, keys, real_rows(200))
        before = wait_until(
            lambda: (r := report(server, keys, V1).json())["rows"] == 200 and r,
            "the shadow thread to score every row",
        )
    finally:
        server.stop()
    saved = json.loads((tmp_path / "registry" / "shadow.json").read_text())
    assert "instances" not in json.dumps(saved)  # counts only
    again = LiveServer(settings_for(tmp_path / "registry", keys, rate_limits=LIMITS))
    try:
        after = report(again, keys, V1).json()
        assert after == before  # the same counts, still active
        predict(again, keys, real_rows(100))
        wait_until(lambda: report(again, keys, V1).json()["rows"] == 300, "counting to go on")
        assert httpx.delete(f"{again.url}/v1/models/{V1}/shadow", headers=admin).is_success
    finally:
        again.stop()
    third = LiveServer(settings_for(tmp_path / "registry", keys, rate_limits=LIMITS))
    try:
        stopped = report(third, keys, V1).json()
        assert not stopped["active"] and stopped["rows"] == 300
    finally:
        third.stop()


def test_unreadable_shadow_reports_do_not_stop_the_service(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    registry = drift_registry(tmp_path / "registry", keys)
    (registry.root / "shadow.json").write_text('{"format": "fedaiot-shadow/1", "candidates": 7}')
    server = LiveServer(settings_for(registry.root, keys, rate_limits=LIMITS))
    try:
        assert "shadow reports" in caplog.text and "unreadable" in caplog.text
        assert report(server, keys, V1).status_code == 404
    finally:
        server.stop()


def test_shadowing_the_served_or_an_unknown_or_tampered_version_is_refused(
    tmp_path: Path, keys: Keys
) -> None:
    server = serve(tmp_path, keys)
    admin = auth(keys, "admin")
    try:
        served = httpx.post(f"{server.url}/v1/models/{V2}/shadow", headers=admin)
        assert served.status_code == 409 and "is the served version" in served.json()["detail"]
        missing = httpx.post(f"{server.url}/v1/models/bc-r0009/shadow", headers=admin)
        assert missing.status_code == 404
        weights = tmp_path / "registry" / "versions" / V1 / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        tampered = httpx.post(f"{server.url}/v1/models/{V1}/shadow", headers=admin)
        assert tampered.status_code == 409 and "hash mismatch" in tampered.json()["detail"]
        assert str(tmp_path) not in tampered.text
    finally:
        server.stop()


def test_a_promotion_reason_goes_to_the_audit_log(tmp_path: Path, keys: Keys) -> None:
    server = serve(tmp_path, keys)
    try:
        reason = "shadow agreement 0.97\non 2,000 rows\x1b[31m; ticket OPS-12"
        done = httpx.post(
            f"{server.url}/v1/models/{V1}/promote", json={"reason": reason},
            headers=auth(keys, "admin", "ops-lead"),
        )  # fmt: skip
        assert done.status_code == 200
        entries = httpx.get(
            f"{server.url}/v1/audit", params={"subject": "ops-lead"}, headers=auth(keys, "auditor")
        ).json()["entries"]
        (row,) = [e for e in entries if e["endpoint"] == "/v1/models/{version}/promote"]
        assert row["note"] == (
            f"promote: {V2} -> {V1}; reason: shadow agreement 0.97 on 2,000 rows [31m; ticket "
            "OPS-12"
        )
        too_long = httpx.post(
            f"{server.url}/v1/models/{V2}/promote", json={"reason": "x" * 501},
            headers=auth(keys, "admin"),
        )  # fmt: skip
        assert too_long.status_code == 422
    finally:
        server.stop()


GATE = """
interval_seconds: 3600   # evaluated by hand below
rules:
  - {{name: gate, kind: promotion_gate, margin: {margin}, min_agreement: 0.0,
     min_shadow_rows: 100, examples: 10000}}
"""


@pytest.mark.parametrize(("margin", "outcome"), [(-0.05, "promote"), (0.0, "refuse")])
def test_the_gate_rule_promotes_or_refuses_a_shadowed_candidate(
    tmp_path: Path, keys: Keys, margin: float, outcome: str
) -> None:
    """V1 (accuracy 0.90) against the served V2 (0.93), each on 10,000 records: 3 points worse,
    within a margin of 5 points (a bound near -3.8), not within a margin of 0."""
    server = serve(tmp_path, keys, GATE.format(margin=margin))
    engine = server.app.state.engine
    try:
        httpx.post(f"{server.url}/v1/models/{V1}/shadow", headers=auth(keys, "admin"))
        if outcome == "promote":
            assert engine.evaluate() == []  # waits for shadow traffic
            predict(server, keys, real_rows(120))
            wait_until(lambda: report(server, keys, V1).json()["rows"] == 120, "shadow scoring")
        (event,) = engine.evaluate()
        assert (event.state, event.subject) == ("decision", V1)
        assert event.message.startswith(f"{outcome}: accuracy 0.9000 against 0.9300")
        decided = report(server, keys, V1).json()
        assert decided["decision"]["outcome"] == outcome and not decided["active"]
        served = httpx.get(f"{server.url}/healthz").json()["model_version"]
        assert served == (V1 if outcome == "promote" else V2)
        reason = "gate_promote" if outcome == "promote" else "gate_refuse"
        (row,) = audit_rows(server, keys, reason)
        assert row["endpoint"] == "(monitor)" and row["note"].startswith("gate gate: ")
        if outcome == "promote":
            assert f"promote: {V2} -> {V1}" in row["note"]
        assert engine.evaluate() == []  # decided once
    finally:
        server.stop()
