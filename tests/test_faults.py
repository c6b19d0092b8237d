"""Simulated faults: deterministic draws, and a coordinator that carries on without the nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedaiot.config.run import RunConfig
from fedaiot.node.round import simulated_ledger_dir, simulated_partition
from fedaiot.privacy.ledger import PrivacyLedger
from fedaiot.rounds.loop import RoundLoop
from fedaiot.simulation import faults
from fedaiot.simulation.inprocess import FIRST_ID, InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


def test_drop_draws_are_deterministic_and_follow_the_rate() -> None:
    cfg = RunConfig(fault_drop_rate=0.3)
    draws = [faults.drops_out(cfg, f"node-{n}", r) for n in range(50) for r in range(1, 21)]
    assert draws == [faults.drops_out(cfg, f"node-{n}", r) for n in range(50) for r in range(1, 21)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(faults.drops_out(RunConfig(), f"node-{n}", 1) for n in range(50))


def test_dropped_nodes_are_recorded_and_secure_rounds_go_on_without_them(tmp_path: Path) -> None:
    cfg = RunConfig(
        task="breast-cancer",
        num_rounds=3,
        epsilon=1.0,
        min_available_nodes=6,
        min_train_nodes=6,
        secure_aggregation=True,
        fault_drop_rate=0.3,
        secagg_dropout=0.3,  # secure aggregation sized for the drop-outs played
        output_dir=str(tmp_path / "run"),
    )
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 6))
    assert summary["status"] == "completed"
    rounds = [
        json.loads(line)
        for line in (cfg.output_path / "journal.jsonl").read_text().splitlines()
        if '"round"' in line
    ]
    dropped = {
        (r, n) for r in range(1, 4) for n in range(6) if faults.drops_out(cfg, f"node-{n}", r)
    }
    assert dropped  # the seed gives this scenario at least one dropout
    seen = {
        (entry["round"], reply["node"], reply["problem"])
        for entry in rounds
        for reply in entry["replies"]
        if reply["status"] != "trained"
    }
    # a node that failed is known to the coordinator by its Flower id, and says only a code
    assert seen == {(r, f"node {FIRST_ID + n}", "dropped-out") for r, n in dropped}
    # a node that dropped out spent nothing that round; the others were charged once per round
    for node in summary["nodes"]:
        index = int(node["id"].removeprefix("node-"))
        trained = sum(1 for r in range(1, 4) if (r, index) not in dropped)
        assert node["rounds"] == trained


def test_a_straggler_past_the_deadline_spends_budget_but_its_update_does_not_count(
    tmp_path: Path,
) -> None:
    cfg = RunConfig(
        task="breast-cancer",
        num_rounds=2,
        epsilon=1.0,
        min_available_nodes=4,
        min_train_nodes=4,
        secure_aggregation=False,
        fault_straggler_rate=0.3,
        fault_straggler_delay=50.0,
        round_timeout=30.0,
        output_dir=str(tmp_path / "run"),
    )
    late = {(r, n) for r in (1, 2) for n in range(4) if faults.straggles(cfg, f"node-{n}", r)}
    assert late
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 4))
    for node in summary["nodes"]:
        index = int(node["id"].removeprefix("node-"))
        assert node["rounds"] == sum((r, index) not in late for r in (1, 2))
    for r, n in late:  # the node's own ledger charged the round it trained for nothing
        data = simulated_partition(cfg, n, 4)
        ledger = json.loads(
            PrivacyLedger.for_data(simulated_ledger_dir(cfg, n), data).path.read_text()
        )
        assert r in [entry["round"] for entry in ledger["rounds"]]
