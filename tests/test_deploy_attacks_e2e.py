"""A coordinator gone bad, against real processes on 127.0.0.1: a SuperLink and three
SuperNodes, TLS and node authentication, kits made as deployment makes them.

Each institution makes its own keys and approves the app bundle; the coordinator registers
them, and one honest round of DP-SGD under authenticated secure aggregation is run (the
honest flow at length, twenty rounds and a crash, is tests/test_deploy_e2e.py). A run of an
unsigned bundle that would copy each node's data is refused by every node, with one line on its
console, before any of its code runs. Then, on the same SuperLink and nodes: the approved bundle
signed only by a key no institution trusts is refused; the coordinator's ServerApp process
(``flwr-serverapp``, whose code no node can check) runs the real secure-aggregation driver
altered in what it relays (tests/deploy_attacks.py): one run swaps gamma's public keys for its
own in what alpha receives (alpha refuses the round, the others finish it), one shows the nodes
different survivor sets (every node refuses to unmask; the coordinator gets no share). The
double is installed through ``sitecustomize`` (tests/coordinator_double/), which reaches a
process Flower spawns without patching Flower. tests/test_malicious_coordinator.py plays the
same doubles in-process, with more detail.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.bundle import approve, read_bundle
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.institution_keys import REVIEW_KEY, init_node
from fedaiot.launch.processes import free_port
from fedaiot.registry.signing import load_public_key
from fedaiot.registry.store import ModelRegistry
from fedaiot.secagg import Roster
from tests.deploy_attacks import ATTACKS, double_env, submit_unsigned
from tests.deploy_support import federation
from tests.test_deploy_e2e import (
    EPSILON,
    INSTITUTIONS,
    TIMEOUT,
    Processes,
    _wait_for,
    processes,
    start_coordinator,
)

pytestmark = pytest.mark.slow
__all__ = ["processes"]  # the fixture, shared with the other deployment tests


def test_nodes_refuse_what_their_institutions_did_not_approve(
    tmp_path: Path, processes: Processes
) -> None:
    started = time.perf_counter()
    # Each institution makes its keys, the coordinator approves the requests, every
    # institution pins the roster and approves the bundle (tests/deploy_support.py).
    fed = federation(tmp_path, INSTITUTIONS, bundle=True)
    pki, kits = fed.pki, fed.kits

    cfg = RunConfig(task="breast-cancer", num_rounds=1, epsilon=EPSILON, output_dir="unused")
    files = dict(zip(INSTITUTIONS, export(cfg, 3, tmp_path / "data", INSTITUTIONS), strict=True))
    run_config = tmp_path / "run.toml"
    run_config.write_text(f'task = "breast-cancer"\nnum-rounds = 1\nepsilon = {EPSILON}\n')
    port = free_port()
    superlink = f"127.0.0.1:{port}"

    node = ["node", "start", "--task", "breast-cancer", "--superlink", superlink]
    # (off-schema data refused before a node starts: tests/test_deploy_e2e.py)

    # 2. The coordinator: SuperLink with TLS, node authentication and a state database.
    state = tmp_path / "state"
    coordinator = [
        "coordinator", "start", "--run-config", str(run_config), "--pki", str(pki),
        "--state", str(state), "--port", str(port), "--json",
        "--bundle", str(fed.bundle), "--approval", str(fed.approvals),
    ]  # fmt: skip
    first_log = tmp_path / "coordinator-1.log"
    first = start_coordinator(processes, coordinator, first_log, state)
    # (a node whose key the coordinator never registered is refused: tests/test_deploy_e2e.py)

    # 4. Three institutions, each with its own file, key and ledger next to its data.
    node_logs = []
    for name in INSTITUTIONS:
        log = tmp_path / f"node-{name}.log"
        node_logs.append(log)
        kit = str(kits[name])
        data = str(files[name])
        processes.start([*node, "--data", data, "--kit", kit, "--port", str(free_port())], log)
    run = state / "runs" / "breast-cancer"
    logs = [first_log, state / "superlink.log", *node_logs]
    roster = Roster.load(pki / "roster.json").fingerprint
    for name, log in zip(INSTITUTIONS, node_logs, strict=True):
        _wait_for(f"{name}'s start", lambda log=log: "in roster" in log.read_text(), logs=logs)
        assert f"{name} in roster {roster}" in log.read_text()
        assert f"runs app bundles signed by {name}-review only" in log.read_text()

    # 4b. A coordinator that skips the approval: every node refuses, none of its code runs.
    loot = tmp_path / "loot"
    loot.mkdir()
    unsigned = submit_unsigned(tmp_path, state, loot)
    said = f"refused run {unsigned}: its app bundle carries no signature (trusted: "
    for log in node_logs:
        _wait_for("the refusal", lambda log=log: said in log.read_text(), logs=logs)
        assert sum(said in line for line in log.read_text().splitlines()) == 1
    answers = _wait_for(
        "the unsigned run's end", lambda: (loot / "server.json").exists(), logs=logs
    )
    assert answers
    assert len(json.loads((loot / "server.json").read_text())) >= 3
    assert "ran" not in json.loads((loot / "server.json").read_text())
    assert sorted(p.name for p in loot.iterdir()) == ["server.json"]  # no data was copied
    # 5. The honest run: one round, securely aggregated with confirmed survivor sets.
    assert first.wait(timeout=TIMEOUT) == 0, first_log.read_text()[-3000:]
    wall = time.perf_counter() - started
    summary: dict[str, Any] = json.loads(first_log.read_text().strip().splitlines()[-1])
    assert (summary["status"], summary["rounds"]) == ("completed", 1)
    events = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    (played,) = [e for e in events if e["event"] == "round"]
    assert played["secure_aggregation"]["error"] == ""
    assert played["secure_aggregation"]["dropped"] == {}
    assert "confirm" in played["stage_seconds"]  # authenticated: survivor sets confirmed
    assert [r["status"] for r in played["replies"]] == ["trained"] * 3
    registry = ModelRegistry(run / "registry")
    _, manifest = registry.load(
        summary["model_version"], load_public_key(pki / "coordinator" / "coordinator.pub")
    )
    assert [n.id for n in manifest.nodes] == INSTITUTIONS

    # 6. One-round runs of a coordinator gone bad, on the same SuperLink and nodes; each
    # institution's console says each refusal once.
    honest_end = time.perf_counter()

    def one_round(
        kind: str, approvals: Path, env: dict[str, str], epsilon: float = 8.0
    ) -> tuple[str, Path]:
        config = tmp_path / f"{kind}.toml"
        config.write_text(
            f'task = "breast-cancer"\nnum-rounds = 1\nepsilon = {epsilon}\noutput-dir = "{kind}"\n'
        )
        args = [str(config) if a == str(run_config) else a for a in coordinator]
        args = [str(approvals) if a == str(fed.approvals) else a for a in args]
        log = tmp_path / f"coordinator-{kind}.log"
        processes.start(args, log, env=env).wait(timeout=TIMEOUT)  # it ends, one way or another
        found = re.search(r"submitted run (\d+)", log.read_text())
        assert found, log.read_text()[-3000:]
        return found.group(1), log

    # 6a. The approved bundle, but signed only by a key no institution trusts: every node
    # refuses to run it (an approval under another name is not an institution's approval).
    assert fed.bundle
    init_node(tmp_path / "mallory", "mallory")
    signed = approve(read_bundle(fed.bundle), tmp_path / "mallory" / REVIEW_KEY, "mallory")
    (tmp_path / "mallory-approvals").mkdir()
    (tmp_path / "mallory-approvals" / "mallory.json").write_text(signed.to_json())
    run_id, log = one_round("untrusted", tmp_path / "mallory-approvals", {})
    said = f"refused run {run_id}: its app bundle is signed by no key this institution trusts"
    for node_log in node_logs:
        _wait_for("the refusal", lambda n=node_log: said in n.read_text(), logs=[log])
        assert sum(said in line for line in node_log.read_text().splitlines()) == 1
    assert ModelRegistry(state / "untrusted" / "registry").versions() == []  # no model came of it

    # 6b. Its ServerApp runs the approved bundle over the real driver, altered in what it
    # relays (tests/deploy_attacks.py): the nodes' signatures and confirmations stand.
    # A node that trained in a tampered round keeps its charge, and each data set has one
    # budget across runs: every attack's run raises the cap by 8 so that all can train in it.
    for index, attack in enumerate(ATTACKS, start=1):
        report = tmp_path / f"{attack.kind}.json"
        env = double_env(attack.kind, report)
        run_id, log = one_round(attack.kind, fed.approvals, env, epsilon=8.0 * index)
        said = f"refused a secure round of run {run_id}: "
        for name, node_log in zip(INSTITUTIONS, node_logs, strict=True):
            if name not in attack.refused_by:
                continue
            seen = lambda n=node_log, s=said: s in n.read_text()  # noqa: E731
            _wait_for(f"{name}'s refusal", seen, logs=[log])
            lines = [x for x in node_log.read_text().splitlines() if x.startswith(said)]
            assert len(lines) == 1 and attack.says in lines[0], lines
            assert f"({name}) refuses" in lines[0]
        for name, node_log in zip(INSTITUTIONS, node_logs, strict=True):
            refused = said in node_log.read_text()
            assert refused == (name in attack.refused_by), (name, node_log.read_text())
        answered = json.loads(report.read_text())
        assert {stage: answered.get(stage) for stage in attack.received} == attack.received
        assert json.loads(log.read_text().strip().splitlines()[-1])["status"] == attack.status

    print(
        f"\ndeployment attacks e2e: {wall:.0f} s to the honest run's end, "
        f"attacks {time.perf_counter() - honest_end:.0f} s"
    )
