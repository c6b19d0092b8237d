"""Monitoring and alerts through the service, over HTTP against a real uvicorn server on
loopback: per-version counts and drift, alert events in every sink (audit log, /v1/alerts, a
loopback webhook, Prometheus), automatic rollbacks, and the coordinator's journal rules."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fedaiot.cli.main import app as cli
from fedaiot.registry.store import ModelRegistry
from fedaiot.serving import ServingStartupError, create_app
from fedaiot.serving.settings import RateLimit
from fedaiot.tasks.histogram import reference
from tests.serving_support import (
    DATA,
    RUN,
    V1,
    V2,
    Keys,
    LiveServer,
    auth,
    make_keys,
    make_manifest,
    model_state,
    settings_for,
)
from tests.waiting import wait_until

LIMITS = {
    role: RateLimit(per_second=10_000, burst=10_000, rows_per_day=1_000_000)
    for role in ("admin", "clinician", "auditor")
}


class Receiver:
    """A loopback webhook: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.stop()


def drift_registry(root: Path, keys: Keys) -> ModelRegistry:
    """V1 (accuracy 0.90) and V2 (0.93, served first), each with the frequencies of the
    standardized data set as its drift reference, as the coordinator writes it."""
    registry = ModelRegistry(root, signing_key=keys.private)
    z = (DATA - DATA.mean(axis=0)) / DATA.std(axis=0)
    for number, accuracy in ((1, 0.90), (2, 0.93)):
        manifest = make_manifest(number, accuracy)
        schema = {**manifest.input_schema, "drift_reference": reference(z)}
        registry.register(model_state(number), manifest.model_copy(update={"input_schema": schema}))
    registry.set_refs(latest=V2, best=V2)
    return registry


def serve(tmp_path: Path, keys: Keys, rules: str) -> tuple[LiveServer, ModelRegistry]:
    registry = drift_registry(tmp_path / "registry", keys)
    path = tmp_path / "alerts.yml"
    path.write_text(rules)
    server = LiveServer(settings_for(registry.root, keys, rate_limits=LIMITS, alert_rules=path))
    return server, registry


def predict(server: LiveServer, keys: Keys, rows: list[list[float]]) -> None:
    for start in range(0, len(rows), 100):
        response = httpx.post(
            f"{server.url}/v1/predict", json={"instances": rows[start : start + 100]},
            headers=auth(keys, "clinician"),
        )  # fmt: skip
        assert response.status_code == 200, response.text


def real_rows(count: int, shift: float = 0.0) -> list[list[float]]:
    rng = np.random.default_rng(7)
    picked = DATA[rng.integers(0, len(DATA), count)] + shift * DATA.std(axis=0)
    return picked.tolist()


def audit_rows(server: LiveServer, keys: Keys, reason: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{server.url}/v1/audit", params={"reason": reason, "limit": 100},
        headers=auth(keys, "auditor"),
    )  # fmt: skip
    return answer.json()["entries"]


def test_per_version_counts_class_mix_and_drift(tmp_path: Path, keys: Keys) -> None:
    server, _ = serve(tmp_path, keys, "rules:\n  - {name: d, kind: drift}\n")
    try:
        predict(server, keys, real_rows(300))
        bad = httpx.post(
            f"{server.url}/v1/predict", json={"instances": [[1.0, 2.0]]},
            headers=auth(keys, "clinician"),
        )  # fmt: skip
        assert bad.status_code == 422
        assert httpx.get(f"{server.url}/v1/predict").status_code in (401, 405)  # not a model's
        view = httpx.get(f"{server.url}/v1/monitoring", headers=auth(keys, "auditor"))
        assert view.status_code == 200
        (snap,) = [v for v in view.json()["versions"] if v["version"] == V2]
        assert (snap["requests"], snap["ok"], snap["refused"], snap["errors"]) == (4, 3, 1, 0)
        assert snap["rows"] == 300 and sum(snap["class_mix"].values()) == 300
        assert snap["refusal_rate"] == pytest.approx(0.25)
        # Latency of the three answered calls: bucket edges, p50 no more than p99.
        assert 0 < snap["latency_ms"]["p50"] <= snap["latency_ms"]["p99"] <= 5000
        # The data set's own rows against its own reference: no drift to speak of.
        assert len(snap["psi"]) == 30 and snap["psi_max"] < 0.25
        text = httpx.get(f"{server.url}/metrics").text
        assert f'fedaiot_model_requests_total{{model_version="{V2}",outcome="ok"}} 3.0' in text
        assert f'fedaiot_model_requests_total{{model_version="{V2}",outcome="refused"}} 1.0' in text
        assert f'fedaiot_input_drift_psi{{feature="mean radius",model_version="{V2}"}}' in text
        assert "fedaiot_model_predicted_class_total" in text
        assert "fedaiot_model_request_duration_seconds_bucket" in text
        for role in ("clinician", "device"):
            denied = httpx.get(f"{server.url}/v1/monitoring", headers=auth(keys, role))
            assert denied.status_code == 403
        # A freshly promoted version's first call, refused, is counted against it.
        promote = httpx.post(f"{server.url}/v1/models/{V1}/promote", headers=auth(keys, "admin"))
        assert promote.status_code == 200
        httpx.post(f"{server.url}/v1/predict", json={"instances": [[1.0]]},
                   headers=auth(keys, "clinician"))  # fmt: skip
        view = httpx.get(f"{server.url}/v1/monitoring", headers=auth(keys, "auditor")).json()
        (first,) = [v for v in view["versions"] if v["version"] == V1]
        assert (first["requests"], first["refused"], first["rows"]) == (1, 1, 0)
    finally:
        server.stop()


def test_a_drift_alert_reaches_every_sink(tmp_path: Path, keys: Keys, receiver: Receiver) -> None:
    rules = f"""
interval_seconds: 0.1
webhook: {{url: "{receiver.url}", timeout_seconds: 5}}
rules:
  - {{name: input-drift, kind: drift, threshold: 1.0, min_rows: 100, for_seconds: 0.3,
     severity: critical}}
"""
    server, _ = serve(tmp_path, keys, rules)
    try:
        predict(server, keys, real_rows(150, shift=3.0))  # every feature 3 sd up
        auditor = auth(keys, "auditor")

        def firing() -> list[dict[str, Any]]:
            return httpx.get(f"{server.url}/v1/alerts", headers=auditor).json()["firing"]

        (event,) = wait_until(firing, "the drift alert to fire")
        assert (event["rule"], event["state"], event["subject"]) == ("input-drift", "firing", V2)
        assert event["value"] > 1.0 and "PSI" in event["message"] and event["action"] is None
        posted = wait_until(lambda: receiver.bodies, "the webhook to receive the alert")
        assert posted[0]["rule"] == "input-drift" and posted[0]["state"] == "firing"
        assert posted[0]["severity"] == "critical" and posted[0]["source"] == "fedaiot"
        (row,) = audit_rows(server, keys, "alert_firing")
        assert row["endpoint"] == "(alert)" and row["subject"] == "monitor"
        assert "input-drift" in row["note"] and row["model_version"] == V2
        text = httpx.get(f"{server.url}/metrics").text
        assert (
            'fedaiot_alerts_total{kind="drift",rule="input-drift",severity="critical",'
            'state="firing"} 1.0'
        ) in text
        assert f'fedaiot_alert_firing{{kind="drift",rule="input-drift",subject="{V2}"}} 1.0' in text
        assert (
            httpx.get(f"{server.url}/v1/alerts", headers=auth(keys, "clinician")).status_code == 403
        )
        assert len(receiver.bodies) == 1  # fired once, not at every evaluation
    finally:
        server.stop()


def test_a_worse_promotion_is_rolled_back_and_audited(tmp_path: Path, keys: Keys) -> None:
    rules = """
interval_seconds: 3600   # evaluated by hand below
rules:
  - {name: accuracy-drop, kind: accuracy_drop, max_drop: 0.02, rollback: true}
"""
    server, _ = serve(tmp_path, keys, rules)
    engine = server.app.state.engine
    admin = auth(keys, "admin")
    try:
        assert engine.evaluate() == []  # V2, served first, has nothing to compare with
        promoted = httpx.post(
            f"{server.url}/v1/models/{V1}/promote", json={"reason": "try the older model"},
            headers=admin,
        )  # fmt: skip
        assert promoted.status_code == 200
        (event,) = engine.evaluate()
        assert (event.state, event.subject) == ("firing", V1)
        assert event.action == f"rollback: {V1} -> {V2}"
        assert httpx.get(f"{server.url}/healthz").json()["model_version"] == V2
        (rolled,) = audit_rows(server, keys, "alert_rollback")
        assert rolled["endpoint"] == "(monitor)" and rolled["model_version"] == V2
        assert rolled["note"].startswith(f"rollback: {V1} -> {V2} (alert accuracy-drop: accuracy")
        (done,) = engine.evaluate()  # V1 is no longer served: its alert resolves
        assert (done.state, done.subject) == ("resolved", V1)
        assert engine.evaluate() == []
        text = httpx.get(f"{server.url}/metrics").text
        assert 'fedaiot_monitor_actions_total{action="rollback",outcome="done"} 1.0' in text
    finally:
        server.stop()


def test_an_error_rate_alert_rolls_back_only_a_promoted_version(tmp_path: Path, keys: Keys) -> None:
    rules = """
interval_seconds: 3600
rules:
  - {name: refusals, kind: error_rate, include_refusals: true, threshold: 0.5,
     min_requests: 10, rollback: true}
"""
    server, _ = serve(tmp_path, keys, rules)
    engine = server.app.state.engine
    bad = {"instances": [[1.0, 2.0]]}  # the wrong shape: refused by the served model
    try:
        for _ in range(10):
            httpx.post(f"{server.url}/v1/predict", json=bad, headers=auth(keys, "clinician"))
        (event,) = engine.evaluate()  # V2 was never promoted: nothing to roll back to
        assert event.state == "firing" and event.action.startswith("no rollback")
        assert "10 of 10 predict calls failed or refused" in event.message
        (refused,) = audit_rows(server, keys, "alert_rollback")
        assert refused["status"] == 409
    finally:
        server.stop()


def _journal(folder: Path, rounds: list[list[tuple[str, str, float]]], first: int = 1) -> None:
    lines = []
    for number, replies in enumerate(rounds, start=first):
        described = [{"node": n, "status": s, "epsilon": e} for n, s, e in replies]
        lines.append(json.dumps({"event": "round", "round": number, "replies": described}))
    with open(folder / "journal.jsonl", "a") as handle:
        handle.write("".join(line + "\n" for line in lines))


def test_coordinator_rules_read_the_runs_journal(tmp_path: Path, keys: Keys) -> None:
    run = tmp_path / "runs" / RUN
    rules = """
interval_seconds: 3600
rules:
  - {name: silent-node, kind: node_missing, journal: runs/bc/journal.jsonl, rounds: 2}
  - {name: budget, kind: budget, journal: runs/bc, fraction: 0.8, epsilon: 1.0}
"""
    server, _ = serve(tmp_path, keys, rules)
    engine = server.app.state.engine
    try:
        assert engine.evaluate() == []
        notes = {r["name"]: r["note"] for r in engine.feed().model_dump()["rules"]}
        assert "no journal" in notes["silent-node"]
        run.mkdir(parents=True)
        _journal(run, [
            [("alpha", "trained", 0.3), ("beta", "trained", 0.3)],
            [("alpha", "trained", 0.6), ("beta", "failed", 0.3)],
            [("alpha", "trained", 0.85)],
        ])  # fmt: skip
        events = {(e.rule, e.subject, e.state) for e in engine.evaluate()}
        assert events == {("silent-node", "beta", "firing"), ("budget", "alpha", "firing")}
        _journal(run, [[("alpha", "refused", 0.85), ("beta", "trained", 0.5)]], first=4)
        assert [(e.rule, e.subject, e.state) for e in engine.evaluate()] == [
            ("silent-node", "beta", "resolved")
        ]
        feed = httpx.get(f"{server.url}/v1/alerts", headers=auth(keys, "admin")).json()
        assert [e["rule"] for e in feed["firing"]] == ["budget"]
        assert "spent epsilon 0.850 of its 1" in feed["firing"][0]["message"]
    finally:
        server.stop()


BAD_RULES = [
    ("rules:\n  - {name: errs, kind: error_rate, threshold: 5}\n",
     "rule 'errs' (rules[0]): field 'threshold'"),
    ("rules:\n  - {name: b, kind: budget, journal: x, rollback: true}\n",
     "rule 'b' (rules[0]): field 'rollback'"),
    ("rules:\n  - {name: d, kind: drift, windw_seconds: 5}\n",
     "rule 'd' (rules[0]): field 'windw_seconds': is not a field of this rule"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_RULES)
def test_a_bad_rules_file_stops_the_service_with_one_line(
    tmp_path: Path, keys: Keys, text: str, message: str
) -> None:
    registry = drift_registry(tmp_path / "registry", keys)
    path = tmp_path / "alerts.yml"
    path.write_text(text)
    with pytest.raises(ServingStartupError, match=r"alert rules .*alerts\.yml: ") as caught:
        create_app(settings_for(registry.root, keys, alert_rules=path))
    assert message in str(caught.value)
    result = CliRunner().invoke(
        cli, ["serve", "--registry", str(registry.root), "--public-key", str(keys.public_path),
              "--alert-rules", str(path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.startswith("error: alert rules") and message in result.output
