"""A model's life on real processes: campaigns through the ``fedaiot`` CLI (the first through
Flower's simulation engine), ``fedaiot serve`` over HTTP, its gate, alerts, webhook and audit.

Five simulated institutions read their own breast-cancer files. Campaign 1 (a quick first
model) is served. Three institutions get new records; the other two, their budgets spent,
refuse. Campaign 2 beats the served model and the gate promotes it after shadow scoring.
The same three then get records whose labels were recorded inverted (a coding error at the
sites): campaign 3 is far worse and the gate refuses it. With nothing new anywhere, campaign 4
fails and registers nothing. A drifted input stream fires the drift alert and a webhook (a
little HTTP server here) receives it. An admin promotes campaign 3 anyway, and the
accuracy-drop rule rolls it back. Every step is read back from the service's audit log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import raw_partitions, write_institution_file
from fedaiot.registry.store import ModelRegistry
from fedaiot.tasks import ArrayData
from tests.serving_support import DATA, Keys, ServeProcess, auth, make_keys
from tests.test_serving_alerts import Receiver
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
NODES, GROWING = 5, 3  # SecAgg+ over 5 nodes survives 2 refusals with secagg-dropout 0.4
FIRST = ["--task", "breast-cancer", "--rounds", "1", "--set", "partitioner=iid"]
FIRST += ["--set", "secagg-dropout=0.4", "--set", "learning-rate=0.02"]  # a cautious first model
RULES = """
interval_seconds: 0.2
webhook: {{url: "{hook}", timeout_seconds: 5}}
rules:
  - {{name: gate, kind: promotion_gate, margin: 0.0, confidence: 0.95, min_agreement: 0.5,
     min_shadow_rows: 100}}
  - {{name: input-drift, kind: drift, threshold: 1.0, window_seconds: 60, for_seconds: 1,
     min_rows: 100, severity: critical}}
  - {{name: accuracy-drop, kind: accuracy_drop, max_drop: 0.05, rollback: true}}
"""
LIMITS = {"clinician": {"per_second": 1000, "burst": 1000, "rows_per_day": 1_000_000,
                        "rows_per_second": 10_000, "rows_burst": 10_000}}  # fmt: skip


def write_nodes(folder: Path, stage: int) -> None:
    """Stage 1: 40 % of each partition. Stage 2: the first three nodes have 70 %. Stage 3:
    they also have the rest, its labels inverted."""
    cfg = RunConfig(task="breast-cancer", partitioner="iid")
    for index, part in enumerate(raw_partitions(cfg, NODES)):
        first, second = int(len(part) * 0.4), int(len(part) * 0.7)
        x, y = part.x[:first], part.y[:first]
        if index < GROWING and stage >= 2:
            x, y = part.x[:second], part.y[:second]
        if index < GROWING and stage >= 3:
            x, y = np.concatenate([x, part.x[second:]]), np.concatenate([y, 1 - part.y[second:]])
        write_institution_file(cfg, ArrayData(x, y), folder / f"node-{index}" / "data")


def campaign(tmp: Path, keys: Keys, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedaiot", "coordinator", "campaign", "--json"]
    command += ["--registry", str(tmp / "registry"), "--signing-key", str(keys.private_path)]
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=900, env=env, cwd=tmp
    )


def registered(answer: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert answer.returncode == 0, answer.stderr[-3000:]
    result: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    assert result["status"] == "registered"
    return result


def rows(count: int, shift: float = 0.0, seed: int = 7) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    picked = DATA[rng.integers(0, len(DATA), count)] + shift * DATA.std(axis=0)
    return picked.tolist()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.stop()


def test_campaigns_gate_alerts_and_rollback(tmp_path: Path, receiver: Receiver) -> None:
    keys = make_keys(tmp_path / "keys")
    nodes = tmp_path / "nodes"
    write_nodes(nodes, 1)
    one = registered(campaign(tmp_path, keys, "--base", "fresh", "--node-data", str(nodes), *FIRST))
    assert one["version"] == "breast-cancer-c1-r0001" and one["base"] is None
    assert all(n["trained"] == 1 and len(n["cohorts"]) == 1 for n in one["nodes"])

    (tmp_path / "alerts.yml").write_text(RULES.format(hook=receiver.url))
    server = ServeProcess(
        tmp_path / "registry", keys, alert_rules=tmp_path / "alerts.yml", rate_limits=LIMITS
    )
    admin, auditor = auth(keys, "admin"), auth(keys, "auditor")

    def served() -> str:
        return str(httpx.get(f"{server.url}/healthz", timeout=30).json()["model_version"])

    def predict(batch: list[list[float]]) -> None:
        for start in range(0, len(batch), 100):
            answer = httpx.post(
                f"{server.url}/v1/predict", json={"instances": batch[start : start + 100]},
                headers=auth(keys, "clinician"), timeout=60,
            )  # fmt: skip
            assert answer.status_code == 200, answer.text

    def report(version: str) -> dict[str, Any]:
        url = f"{server.url}/v1/models/{version}/shadow"
        return dict(httpx.get(url, headers=auditor, timeout=30).json())

    try:
        assert served() == one["version"]

        # new records at three sites; the other two have spent their budgets and refuse
        write_nodes(nodes, 2)
        onward = ["--set", "learning-rate=0.2", "--engine", "inprocess"]  # the usual step now
        two = registered(campaign(tmp_path, keys, "--rounds", "4", *onward))
        assert two["base"] == one["version"] and two["accuracy"] > one["accuracy"]
        growing, still = two["nodes"][:GROWING], two["nodes"][GROWING:]
        assert all(n["trained"] == 4 and len(n["cohorts"]) == 2 for n in growing)
        assert all(n["trained"] == 0 and n["refused"] == 4 for n in still)
        for node in growing:  # the old records kept their spend; the new ones spent their own
            old, new = node["cohorts"]
            assert old["runs"] == ["breast-cancer-c1"] and "breast-cancer-c2" in new["runs"]
            assert 0 < new["epsilon"] <= 3.0 and old["epsilon"] <= 3.0
        assert served() == one["version"]  # a candidate, not served

        started = httpx.post(f"{server.url}/v1/models/{two['version']}/shadow", headers=admin)
        assert started.status_code == 200, started.text
        predict(rows(200))
        decided = wait_until(
            lambda: report(two["version"])["decision"], "the gate to decide on campaign 2"
        )
        assert decided["outcome"] == "promote", decided
        assert served() == two["version"]

        # inverted labels at the three sites: a much worse candidate
        write_nodes(nodes, 3)
        three = registered(campaign(tmp_path, keys, "--rounds", "3", *onward))
        assert three["base"] == two["version"]
        assert three["accuracy"] < two["accuracy"] - 0.2
        started = httpx.post(f"{server.url}/v1/models/{three['version']}/shadow", headers=admin)
        assert started.status_code == 200, started.text
        decided = wait_until(
            lambda: report(three["version"])["decision"], "the gate to decide on campaign 3"
        )
        assert decided["outcome"] == "refuse" and served() == two["version"]

        # nothing new anywhere: nobody can train, nothing is registered
        before = ModelRegistry(tmp_path / "registry").versions()
        four = campaign(tmp_path, keys, "--rounds", "2", *onward)
        assert four.returncode == 3, four.stderr[-2000:]
        assert "every node refused to train" in four.stderr and "nothing was registered" in (
            four.stderr
        )
        assert ModelRegistry(tmp_path / "registry").versions() == before

        # a drifted stream (every feature 3 sd up) fires the drift alert and the webhook
        predict(rows(150, shift=3.0, seed=8))

        def drift_posted() -> list[dict[str, Any]]:
            return [b for b in receiver.bodies if b["rule"] == "input-drift"]

        (posted, *_) = wait_until(drift_posted, "the webhook to receive the drift alert")
        assert posted["state"] == "firing" and posted["subject"] == two["version"]
        firing = httpx.get(f"{server.url}/v1/alerts", headers=auditor).json()["firing"]
        assert any(e["rule"] == "input-drift" for e in firing)

        # a bad model promoted by hand is rolled back by the accuracy-drop rule
        forced = httpx.post(
            f"{server.url}/v1/models/{three['version']}/promote", headers=admin,
            json={"reason": "site asked for the newest model"},
        )  # fmt: skip
        assert forced.status_code == 200, forced.text
        wait_until(lambda: served() == two["version"], "the rule to roll campaign 3 back")

        audit = httpx.get(f"{server.url}/v1/audit", params={"limit": 1000}, headers=auditor)
        entries = audit.json()["entries"]
    finally:
        server.stop()

    def notes(reason: str) -> list[str]:
        return [str(e["note"]) for e in entries if e["reason"] == reason]

    candidates = notes("campaign_candidate")
    assert len(candidates) == 3
    assert any(f"campaign breast-cancer-c2 from {one['version']}" in n for n in candidates)
    assert any("2 refused" in n for n in candidates)
    (failed,) = notes("campaign_failed")
    assert "breast-cancer-c4" in failed and "every node refused" in failed
    (promoted,) = notes("gate_promote")
    assert f"promote: {one['version']} -> {two['version']}" in promoted
    (refused,) = notes("gate_refuse")
    assert three["version"] in refused and "below the margin" in refused
    every = [str(e["note"]) for e in entries]
    assert len([n for n in every if n.startswith("shadow started")]) == 2
    assert any("input-drift" in n for n in notes("alert_firing"))
    forced_note = f"promote: {two['version']} -> {three['version']}; reason: site asked"
    assert any(n.startswith(forced_note) for n in every)
    (rollback,) = notes("alert_rollback")
    assert rollback.startswith(f"rollback: {three['version']} -> {two['version']} (alert accur")
