"""Campaigns on a real deployment: the coordinator's kit trains each campaign on the
institutions' own SuperNodes (TLS, node authentication, secure aggregation), continuing from
the served model, and registers the candidate in the service's registry.

Three institutions' nodes stay up across two campaigns (each campaign starts the SuperLink,
runs, and stops it; the nodes reconnect). Campaign 1 starts fresh; its candidate is served;
alpha's file then grows, and campaign 2 continues from the served version: alpha's new records
form a cohort with a budget of their own, the old records keep their spend.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export
from fedaiot.launch.processes import free_port
from fedaiot.node.deployed import default_ledger_dir
from fedaiot.privacy.cohorts import INDEX_FILE
from fedaiot.registry.store import ModelRegistry
from tests.deploy_support import federation
from tests.test_deploy_e2e import Processes
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
FEDAIOT = [sys.executable, "-m", "fedaiot"]
INSTITUTIONS = ["alpha", "beta", "gamma"]
TIMEOUT = 900
HOLD = 3  # seconds: gamma's --reply-every


@pytest.fixture
def processes() -> Any:
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.stop_all()


def test_campaigns_train_on_the_institutions_nodes(tmp_path: Path, processes: Processes) -> None:
    fed = federation(tmp_path, INSTITUTIONS, bundle=True)
    cfg = RunConfig(task="breast-cancer", output_dir="unused")
    files = dict(zip(INSTITUTIONS, export(cfg, 3, tmp_path / "data", INSTITUTIONS), strict=True))
    header, *rows = files["alpha"].read_text().splitlines()
    kept = len(rows) * 2 // 3  # alpha holds back a third of its records until campaign 2
    files["alpha"].write_text("\n".join([header, *rows[:kept]]) + "\n")

    port = free_port()
    assert fed.bundle is not None and fed.approvals is not None
    registry = tmp_path / "service" / "registry"
    kit = [
        "--engine", "deployed", "--pki", str(fed.pki), "--state", str(tmp_path / "state"),
        "--bundle", str(fed.bundle), "--approval", str(fed.approvals), "--port", str(port),
    ]  # fmt: skip
    logs: list[Path] = []

    def start(log: Path, *args: str) -> subprocess.Popen[bytes]:
        logs.append(log)
        command = ["coordinator", "campaign", "--registry", str(registry), *kit, *args, "--json"]
        return processes.start(command, log)

    def result(process: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
        tails = "".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in logs if p.exists())
        assert process.wait(timeout=TIMEOUT) == 0, tails
        done: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
        return done

    first_log = tmp_path / "campaign-1.log"
    first = start(first_log, "--base", "fresh", "--task", "breast-cancer", "--rounds", "3",
                  "--epsilon", "4")  # fmt: skip
    # the first campaign's kit registers the institutions' keys; then their nodes can connect
    wait_until(lambda: "submitted run " in first_log.read_text(), "the run", timeout=300)
    for name in INSTITUTIONS:
        log = tmp_path / f"node-{name}.log"
        logs.append(log)
        # gamma holds its replies in time (its size must not show in when they come)
        held = ["--reply-every", str(HOLD)] if name == "gamma" else []
        processes.start(
            [
                "node", "start", "--task", "breast-cancer", "--superlink", f"127.0.0.1:{port}",
                "--data", str(files[name]), "--kit", str(fed.kits[name]),
                "--port", str(free_port()), *held,
            ],
            log,
        )  # fmt: skip
    one = result(first, first_log)
    assert f"replies held to multiples of {HOLD} s" in (tmp_path / "node-gamma.log").read_text()
    journal = registry.parent / "campaigns" / "breast-cancer-c1" / "journal.jsonl"
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    seconds = [e["seconds"] for e in events if e["event"] == "round"]
    assert len(seconds) == 3 and min(seconds) >= HOLD, seconds  # each round waited for gamma
    assert one["status"] == "registered" and one["version"] == "breast-cancer-c1-r0003"
    assert one["accuracy"] > 0.8
    assert {n["node"]: n["trained"] for n in one["nodes"]} == dict.fromkeys(INSTITUTIONS, 3)
    store = ModelRegistry(registry)
    manifest = store.manifest(one["version"])
    assert manifest.lineage["engine"] == "deployed" and manifest.lineage["base"] is None
    assert [n.id for n in manifest.nodes] == INSTITUTIONS  # named by their authenticated keys
    store.set_refs(served=one["version"])  # as the gate or an admin would

    # alpha's new records arrive; campaign 2 continues from the served version
    files["alpha"].write_text("\n".join([header, *rows]) + "\n")
    second_log = tmp_path / "campaign-2.log"
    two = result(start(second_log, "--rounds", "2"), second_log)
    assert two["base"] == one["version"] and two["version"] == "breast-cancer-c2-r0002"
    assert {n["node"]: n["trained"] for n in two["nodes"]} == dict.fromkeys(INSTITUTIONS, 2)
    continued = store.manifest(two["version"])
    assert continued.config["init_version"] == one["version"]
    assert continued.lineage["base"] == one["version"]

    cohorts = json.loads((default_ledger_dir(files["alpha"]) / INDEX_FILE).read_text())["cohorts"]
    assert len(cohorts) == 2  # the old records and the new ones, each with its own ledger
    others = [default_ledger_dir(files[n]) / INDEX_FILE for n in ("beta", "gamma")]
    assert all(len(json.loads(p.read_text())["cohorts"]) == 1 for p in others)

    with sqlite3.connect(registry / "audit.sqlite3") as audit:
        notes = [n for (n,) in audit.execute("SELECT note FROM audit WHERE reason = ?",
                                             ("campaign_candidate",))]  # fmt: skip
    assert len(notes) == 2 and f"from {one['version']}" in notes[1]
