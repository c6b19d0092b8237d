"""A malicious coordinator against deployed nodes, in-process: a test double of the coordinator
that runs the real protocol (``SecureAggregation``, the round loop) and tampers with what it
relays, over the in-process grid to the real ClientApp handlers. Every node is set up as
deployment sets it up: its own kit (``node init``, ``node pin``), the node config ``fedaiot node
start`` writes, its own data file and ledger. Only the transport differs from a deployment.

tests/test_deploy_e2e.py plays the same doubles (tests/coordinator_doubles.py) over real
processes, in a deployed coordinator's ServerApp; here, where a round takes a second, the
assertions go further: what the coordinator got from each node, the 5-node split view with
colluders, the refusal of an unauthenticated round before any budget is touched.
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.node_console import RefusalWatcher
from fedaiot.deploy.supernode import NodeKit, prepare
from fedaiot.rounds import loop
from fedaiot.rounds.loop import RoundLoop
from fedaiot.secure_rounds.wire import CONFIRM, SHARE_KEYS, UNMASK
from fedaiot.simulation.inprocess import FIRST_ID, InProcessGrid
from tests.coordinator_doubles import Double, SplitsTheSurvivors, SwapsKeys
from tests.deploy_support import federation

pytestmark = pytest.mark.usefixtures("flower_identity")
NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]


def _deployment(tmp_path: Path, n: int, **overrides: Any) -> tuple[RunConfig, InProcessGrid]:
    names = NAMES[:n]
    fed = federation(tmp_path, names)
    roster = tmp_path / "coordinator-roster.json"  # what `coordinator start` registered
    roster.write_text(json.dumps({str(FIRST_ID + i): name for i, name in enumerate(names)}))
    cfg = RunConfig(
        task="breast-cancer",
        num_rounds=1,
        epsilon=2.0,
        min_available_nodes=n,
        node_roster=str(roster),
        output_dir=str(tmp_path / "run"),
        **overrides,
    )
    files = export(cfg, n, tmp_path / "data", names)
    grid = InProcessGrid(cfg, n)
    for i, name in enumerate(names):
        kit = NodeKit(fed.kits[name])
        kit.check()
        prepared = prepare(task="breast-cancer", data=files[i], name=name, kit=kit)
        grid.contexts[i].node_config = tomllib.loads(prepared.node_config.read_text())
    return cfg, grid


def _round(cfg: RunConfig) -> dict[str, Any]:
    events = [json.loads(x) for x in (cfg.output_path / "journal.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "round")


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]


@pytest.fixture(autouse=True)
def _fresh_doubles() -> None:
    Double.made.clear()


def test_deployed_nodes_run_an_authenticated_round_with_confirmations(tmp_path: Path) -> None:
    cfg, grid = _deployment(tmp_path, 3)
    summary = RoundLoop(cfg).run_rounds(grid)
    event = _round(cfg)
    assert summary["status"] == "completed", event
    assert (
        event["secure_aggregation"]["error"] == "" and event["secure_aggregation"]["dropped"] == {}
    )
    assert "confirm" in event["stage_seconds"]  # the survivor sets were confirmed first
    assert sorted(r["node"] for r in event["replies"]) == ["alpha", "beta", "gamma"]


def test_a_coordinator_that_swaps_a_public_key_is_refused_by_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loop, "SecureAggregation", SwapsKeys)  # alpha gets gamma's swapped
    cfg, grid = _deployment(tmp_path, 3)
    with caplog.at_level(logging.WARNING, logger="fedaiot.node.round"):
        RoundLoop(cfg).run_rounds(grid)
    double = Double.made[-1]
    node = {name: i for i, name in double.names.items()}
    refusal = _refusals(caplog)
    assert len(refusal) == 1 and f"node {node['alpha']} (alpha) refuses the round" in refusal[0]
    assert (
        f"relayed for node {node['gamma']} (gamma) are not signed by gamma's identity key"
        in refusal[0]
    )
    # alpha sealed nothing under the substituted key: the coordinator holds no share of it
    assert all(bundle.node_id != node["alpha"] for bundle in double.received[SHARE_KEYS])
    event = _round(cfg)
    assert event["secure_aggregation"]["dropped"]["alpha"] == (
        "ShareBundle: the node failed (protocol-error)"
    )
    # the institution's console gets the refusal in one line
    watcher = RefusalWatcher(Path("unused"), 0, ["alpha-review"], print)
    logged = "WARNING : fedaiot node: query.secagg_share failed (protocol-error): "
    shown = watcher.lines(f"[RUN 7]\n{logged}AuthenticationError: {refusal[0]}\n")
    assert shown == [f"refused a secure round of run 7: {refusal[0]}"]


@pytest.mark.parametrize(("nodes", "relays"), [(5, "matching"), (5, "all"), (3, "all")])
def test_a_coordinator_that_shows_nodes_different_survivor_sets_gets_no_share(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    nodes: int,
    relays: str,
) -> None:
    monkeypatch.setattr(SplitsTheSurvivors, "relays", relays)
    monkeypatch.setattr(loop, "SecureAggregation", SplitsTheSurvivors)
    cfg, grid = _deployment(tmp_path, nodes)  # secagg-collusion 0.2: 4 of 5 confirmations
    with caplog.at_level(logging.WARNING, logger="fedaiot.node.round"):
        summary = RoundLoop(cfg).run_rounds(grid)
    double = Double.made[-1]
    assert len(double.received[CONFIRM]) == nodes  # every node signed the sets it was shown ...
    assert double.received[UNMASK] == []  # ... and none revealed a share
    refusals = _refusals(caplog)
    assert len(refusals) == nodes
    if relays == "matching":
        assert all("confirmed the survivor set it was shown, 4 are needed" in r for r in refusals)
    else:  # the 3-node split is the one tests/test_deploy_e2e.py plays on real processes
        assert all("did not sign the survivor set this node was shown" in r for r in refusals)
    assert summary["status"] == "no-aggregate"
    assert "fewer than the threshold" in _round(cfg)["secure_aggregation"]["error"]


def test_a_deployed_node_refuses_an_unauthenticated_round_before_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, grid = _deployment(tmp_path, 3)
    anonymous = cfg.model_copy(update={"node_roster": ""})  # the setup names no institution
    with caplog.at_level(logging.WARNING, logger="fedaiot.node.round"):
        RoundLoop(anonymous).run_rounds(grid)
    refusals = _refusals(caplog)
    assert len(refusals) == 3 and all("names no institution" in r for r in refusals)
    replies = _round(anonymous)["replies"]
    assert [(r["status"], r["problem"]) for r in replies] == [("failed", "protocol-error")] * 3
    assert not list((tmp_path / "data").rglob("ledger-*.json"))  # no budget was touched
