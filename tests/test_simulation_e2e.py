"""End to end through Flower's simulation engine: the real SuperLink, Ray, apps and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedaiot.config.run import RunConfig
from fedaiot.node.round import simulated_partition
from fedaiot.privacy.accounting import epsilon_prv
from fedaiot.privacy.ledger import PrivacyLedger
from fedaiot.registry.store import ModelRegistry
from fedaiot.simulation.engine import simulate

pytestmark = pytest.mark.slow
FEDAIOT = [sys.executable, "-m", "fedaiot"]
RUN = ["simulate", "--task", "breast-cancer", "--nodes", "3", "--rounds", "2", "--epsilon", "1"]


def _fedaiot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDAIOT, *args], capture_output=True, text=True, timeout=600, env=env or os.environ.copy()
    )


def _journal_rounds(run: Path) -> list[int]:
    lines = (run / "journal.jsonl").read_text().splitlines()
    return [e["round"] for e in map(json.loads, lines) if e["event"] == "round"]


def test_three_nodes_two_rounds_paused_then_resumed(tmp_path: Path) -> None:
    run = tmp_path / "bc"
    first = _fedaiot(*RUN, "--output", str(run), "--stop-after", "1", "--json")
    assert first.returncode == 0, first.stderr
    paused: dict[str, Any] = json.loads(first.stdout)
    assert (paused["status"], paused["rounds"]) == ("paused", 1)

    second = _fedaiot(*RUN, "--output", str(run), "--json")
    assert second.returncode == 0, second.stderr
    summary: dict[str, Any] = json.loads(second.stdout)
    assert {"accuracy", "loss", "rounds", "wall_seconds", "model_version", "nodes"} <= set(summary)
    assert (summary["status"], summary["rounds"]) == ("completed", 2)
    assert 0.5 < summary["accuracy"] <= 1.0
    assert "auc" in summary["metrics"] and "sensitivity" in summary["metrics"]

    # no round repeated, none lost, across the pause
    assert _journal_rounds(run) == [1, 2]
    # securely aggregated (the default): no errors, no node's example count in the clear
    rounds = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    secure = [e["secure_aggregation"] for e in rounds if e["event"] == "round"]
    assert [(s["error"], s["dropped"]) for s in secure] == [("", {})] * 2
    assert all(node["examples"] is None for node in summary["nodes"])
    registry = ModelRegistry(run / "registry")
    assert registry.versions() == ["bc-r0001", "bc-r0002"]
    assert registry.refs()["latest"] == "bc-r0002" == summary["model_version"]
    assert registry.refs()["best"] in registry.versions()
    _, manifest = registry.load("bc-r0002")
    assert manifest.task == "breast-cancer" and manifest.round == 2
    assert manifest.input_schema["shape"] == [30]

    # every node's epsilon: within budget, counted once per round, and independently reproducible
    assert [n["id"] for n in summary["nodes"]] == ["node-0", "node-1", "node-2"]
    cfg = RunConfig(task="breast-cancer", num_rounds=2, epsilon=1.0)
    for index, node in enumerate(summary["nodes"]):
        data = simulated_partition(cfg, index, 3)
        ledger = json.loads(
            PrivacyLedger.for_data(run / "ledgers" / f"node-{index}", data).path.read_text()
        )
        assert [entry["round"] for entry in ledger["rounds"]] == [1, 2]
        assert node["epsilon"] <= 1.0
        assert node["epsilon"] == pytest.approx(ledger["rounds"][-1]["epsilon"])
        independent = epsilon_prv([tuple(h) for h in ledger["history"]], node["delta"])
        assert abs(independent - node["epsilon"]) / node["epsilon"] < 0.01
    assert summary["privacy"]["private"] and summary["privacy"]["secure_aggregation"]
    verify = _fedaiot(
        "ledger", "verify", *map(str, sorted((run / "ledgers").rglob("ledger-*.json")))
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.count("prv") == 3

    # the same command again: nothing left to do, nothing rewritten
    before = sorted(p.stat().st_mtime_ns for p in (run / "registry").rglob("*"))
    again = _fedaiot(*RUN, "--output", str(run), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["model_version"] == "bc-r0002"
    assert sorted(p.stat().st_mtime_ns for p in (run / "registry").rglob("*")) == before

    # a tampered model file stops a resume with one clear line, and is left as it was
    weights = run / "registry" / "versions" / "bc-r0002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    tampered = weights.read_bytes()
    broken = _fedaiot(*RUN, "--output", str(run))
    assert broken.returncode == 2
    assert "hash mismatch" in broken.stderr
    assert weights.read_bytes() == tampered
    assert _journal_rounds(run) == [1, 2]


def test_a_run_that_fails_inside_flower_is_reported_as_failed(tmp_path: Path, monkeypatch) -> None:
    """Flower's own `flwr run` exits 0 here; fedaiot reads the journal and says 'failed'."""
    monkeypatch.setenv("FEDAIOT_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    cfg = RunConfig(task="fashion-mnist", num_rounds=1, output_dir=str(tmp_path / "fm"))
    outcome = simulate(cfg, 2)
    assert outcome.status == "failed"
    assert "fashion-mnist data not found" in outcome.error


def test_a_run_that_aggregated_nothing_exits_4_and_registers_nothing(tmp_path: Path) -> None:
    run = tmp_path / "nothing"
    every_node_drops = ["--set", "fault-drop-rate=0.99", "--secure-aggregation", "off"]
    done = _fedaiot(*RUN, "--output", str(run), *every_node_drops)
    assert done.returncode == 4, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "no round aggregated any update" in last and "no model was registered" in last
    assert not (run / "registry" / "versions").exists()
    assert _journal_rounds(run) == [1, 2]
