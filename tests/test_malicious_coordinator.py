"""A malicious coordinator against deployed nodes, in-process: a test double of the coordinator
that runs the real protocol (``SecureAggregation``, the round loop) and tampers with what it
relays, over the in-process grid to the real ClientApp handlers. Every node is set up as
deployment sets it up: its own kit (``node init``, ``node pin``), the node config ``fedaiot node
start`` writes, its own data file and ledger. Only the transport differs from a deployment
(tests/test_deploy_e2e.py plays the bundle attack over real processes).

Why in-process: over real processes the double would have to run inside the coordinator's
SuperLink or ServerApp, whose code the institutions' signatures do not cover (only the nodes
check them), so a modified coordinator is just as possible there; but injecting it would mean
patching Flower's processes from a test. Here the double subclasses the real driver and
changes only the messages it relays, and the nodes run exactly the deployed node's code.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.node_console import RefusalWatcher
from fedaiot.deploy.supernode import NodeKit, prepare
from fedaiot.rounds import loop
from fedaiot.rounds.loop import RoundLoop
from fedaiot.secagg import NeighbourKeys, crypto
from fedaiot.secure_rounds.wire import CONFIRM, SHARE_KEYS, UNMASK
from fedaiot.simulation.inprocess import FIRST_ID, InProcessGrid
from tests.coordinator_doubles import Double, SplitsTheSurvivors
from tests.deploy_support import federation

pytestmark = pytest.mark.usefixtures("flower_identity")
NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]


def _deployment(tmp_path: Path, n: int, **overrides: Any) -> tuple[RunConfig, InProcessGrid]:
    names = NAMES[:n]
    fed = federation(tmp_path, names)
    roster = tmp_path / "coordinator-roster.json"  # what `coordinator start` registered
    roster.write_text(json.dumps({str(FIRST_ID + i): name for i, name in enumerate(names)}))
    settings: dict[str, Any] = {"num_rounds": 1, **overrides}
    cfg = RunConfig(
        task="breast-cancer",
        epsilon=2.0,
        min_available_nodes=n,
        node_roster=str(roster),
        output_dir=str(tmp_path / "run"),
        **settings,
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


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> type[Double]:
    Double.made.clear()
    return Double


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
    mine = crypto.generate_private_key()  # the coordinator's own pair, in gamma's place

    class SwapsGammasKeys(Double):
        def tamper(self, message_type: str, outbox: dict[int, Any]) -> dict[int, Any]:
            if message_type != SHARE_KEYS:
                return outbox
            node = {name: i for i, name in self.names.items()}  # protocol ids, drawn per round
            alpha, gamma = node["alpha"], node["gamma"]
            to_alpha: NeighbourKeys = outbox[alpha]
            swapped = (crypto.public_bytes(mine), crypto.public_bytes(mine))
            return {**outbox, alpha: replace(to_alpha, keys={**to_alpha.keys, gamma: swapped})}

    monkeypatch.setattr(loop, "SecureAggregation", SwapsGammasKeys)
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


@pytest.mark.parametrize("relays", ["matching", "all"])
def test_a_coordinator_that_shows_nodes_different_survivor_sets_gets_no_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, relays: str
) -> None:
    class Splits(SplitsTheSurvivors):
        pass

    Splits.relays = relays  # "matching": each node gets only the confirmations of its view
    monkeypatch.setattr(loop, "SecureAggregation", Splits)
    cfg, grid = _deployment(tmp_path, 5)  # secagg-collusion 0.2: 4 of 5 confirmations needed
    with caplog.at_level(logging.WARNING, logger="fedaiot.node.round"):
        summary = RoundLoop(cfg).run_rounds(grid)
    double = Double.made[-1]
    assert len(double.received[CONFIRM]) == 5  # every node signed the sets it was shown ...
    assert double.received[UNMASK] == []  # ... and none revealed a share
    refusals = _refusals(caplog)
    assert len(refusals) == 5
    if relays == "matching":
        assert all("confirmed the survivor set it was shown, 4 are needed" in r for r in refusals)
    else:
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
    event = _round(anonymous)
    # refused at the advertising exchange, before any request to train was sent
    assert event["replies"] == []
    dropped = event["secure_aggregation"]["dropped"]  # no roster: the nodes go unnamed
    assert list(dropped.values()) == ["KeyAdvert: the node failed (protocol-error)"] * 3
    assert not list((tmp_path / "data").rglob("ledger-*.json"))  # no budget was touched


def test_keys_advertised_ahead_are_signed_and_checked_like_any_advertisement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 3's keys ride on round 2's masked inputs and are relayed with its unmask requests:
    they carry the same signatures, the nodes check them the same way, a node that refuses
    them still answers round 2, and the survivor sets are still confirmed first."""
    mine = crypto.generate_private_key()

    class SwapsAheadKeys(Double):
        """Honest until it relays round 3's keys (in round 2): then it swaps gamma's for alpha."""

        def tamper(self, message_type: str, outbox: dict[int, Any]) -> dict[int, Any]:
            if message_type != SHARE_KEYS or len(Double.made) < 2:
                return outbox
            prepared = self.chain.prepared  # the adverts that rode on the masked inputs
            assert prepared is not None and len(prepared.adverts) == 3
            assert all(a.signature for a in prepared.adverts)
            node = {name: i for i, name in self.names.items()}
            alpha, gamma = node["alpha"], node["gamma"]
            to_alpha: NeighbourKeys = outbox[alpha]
            swapped = (crypto.public_bytes(mine), crypto.public_bytes(mine))
            return {**outbox, alpha: replace(to_alpha, keys={**to_alpha.keys, gamma: swapped})}

    Double.made.clear()  # one driver per round: the second is round 2's
    monkeypatch.setattr(loop, "SecureAggregation", SwapsAheadKeys)
    cfg, grid = _deployment(tmp_path, 3, num_rounds=3)
    with caplog.at_level(logging.WARNING, logger="fedaiot.node.round"):
        RoundLoop(cfg).run_rounds(grid)
    events = [json.loads(x) for x in (cfg.output_path / "journal.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["event"] == "round"]
    # round 2: keys and shares ahead, three exchanges (train and mask, confirm, unmask); alpha
    # refused round 3's keys in its unmask answer and still unmasked round 2
    two = rounds[1]
    assert two["secure_aggregation"]["shares_ahead"] and two["exchanges"] == 3
    assert "confirm" in two["stage_seconds"] and two["aggregated"]
    assert two["secure_aggregation"]["dropped"] == {}
    refusal = _refusals(caplog)
    assert len(refusal) == 1 and "(alpha) refuses the round" in refusal[0]
    assert "are not signed by gamma's identity key" in refusal[0]
    # round 3 goes on without alpha, which sealed nothing under the substituted key
    three = rounds[2]
    assert three["secure_aggregation"]["keys_ahead"]
    assert three["secure_aggregation"]["dropped"] == {
        "alpha": "ShareBundle: the node failed (protocol-error)"
    }
    assert three["aggregated"]
