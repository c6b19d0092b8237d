"""The Prometheus alerting rules and the Grafana dashboard shipped in deploy/: they load (in
promtool when it is installed, its unit tests included), and every fedaiot metric they query
is one the service really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving_support import Keys, LiveServer, auth, make_keys, settings_for
from tests.test_serving_alerts import LIMITS, drift_registry, predict, real_rows

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "fedaiot-serving.json"
METRIC = re.compile(r"\bfedaiot_[a-z0-9_]+\b")
PROMTOOL = shutil.which("promtool")


def _rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_every_alerting_rule_has_what_an_operator_needs() -> None:
    rules = _rules()
    assert len(rules) >= 8
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        assert panel["datasource"]["uid"] == "${datasource}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def test_every_metric_queried_is_exported_by_the_service(tmp_path: Path, keys: Keys) -> None:
    registry = drift_registry(tmp_path / "registry", keys)
    rules = tmp_path / "alerts.yml"
    rules.write_text("interval_seconds: 3600\nrules:\n  - {name: d, kind: drift, min_rows: 1}\n")
    server = LiveServer(settings_for(registry.root, keys, rate_limits=LIMITS, alert_rules=rules))
    try:
        predict(server, keys, real_rows(50, shift=4.0))
        httpx.post(
            f"{server.url}/v1/predict", json={"instances": [[1.0]]}, headers=auth(keys, "clinician")
        )
        server.app.state.engine.evaluate()  # the drift rule fires: alert series exist
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            exported.add(line.split()[2])
        elif line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    queried = {
        m for e in [r["expr"] for r in _rules()] + _dashboard_exprs() for m in METRIC.findall(e)
    }
    assert queried, "no fedaiot metric found in the rules and the dashboard"
    missing = sorted(queried - exported)
    assert not missing, f"queried but not exported: {missing}"
