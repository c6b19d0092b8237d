"""The coordinator's loop with the real ClientApp handler, over an in-process grid (no Ray).

Refusals, rejected updates and failures must be recorded while the round goes on with the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message

from clients.client_app import train
from fedaiot.config.run import RunConfig
from fedaiot.node.round import simulated_ledger_dir, simulated_partition
from fedaiot.privacy.ledger import PrivacyLedger
from fedaiot.rounds.loop import RoundLoop
from fedaiot.simulation.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")
Handler = Callable[[Message, Context], Message]


def _cfg(tmp_path: Path, name: str = "run", **overrides: Any) -> RunConfig:
    """A breast-cancer run of one round over three plain (not secure) nodes, unless told."""
    fields: dict[str, Any] = {
        "task": "breast-cancer",
        "num_rounds": 1,
        "epsilon": 1.0,
        "min_available_nodes": 3,
        "secure_aggregation": False,
    }
    return RunConfig(**{**fields, **overrides}, output_dir=str(tmp_path / name))


def _poisoned(message: Message, context: Context) -> Message:
    reply = train(message, context)
    arrays: ArrayRecord = reply.content["arrays"]  # type: ignore[assignment]
    state = arrays.to_torch_state_dict()
    first = next(iter(state))
    state[first] = torch.full_like(state[first], math.nan)
    reply.content["arrays"] = ArrayRecord(state)
    return reply


def test_refused_and_rejected_nodes_are_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_rounds=2)
    # node-1 arrives with its budget already spent on an earlier run over the same data
    spent = PrivacyLedger.for_data(simulated_ledger_dir(cfg, 1), simulated_partition(cfg, 1, 3))
    with spent.update() as record:
        record.history = [(0.5, 0.5, 500)]

    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, [train, train, _poisoned]))

    assert summary["status"] == "completed"
    assert summary["rounds"] == 2
    assert math.isfinite(summary["loss"])
    nodes = {n["id"]: n for n in summary["nodes"]}
    assert nodes["node-0"]["rounds"] == 2
    assert nodes["node-1"]["rounds"] == 0
    assert nodes["node-1"]["epsilon"] > cfg.epsilon  # what it had spent, reported as is
    assert "node-2" in nodes  # trained (and was accounted), but its update never reached the model
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    replies = [r for e in events if e["event"] == "round" for r in e["replies"]]
    statuses = {(r["node"], r["status"]) for r in replies}
    assert statuses == {("node-0", "trained"), ("node-1", "refused"), ("node-2", "rejected")}
    assert any(r["problem"] == "budget-exhausted" for r in replies if r["node"] == "node-1")
    assert any("NaN" in r["problem"] for r in replies if r["node"] == "node-2")


def test_every_node_out_of_budget_ends_the_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_rounds=3, epsilon=0.5, min_available_nodes=2)
    for partition in range(2):
        data = simulated_partition(cfg, partition, 2)
        ledger = PrivacyLedger.for_data(simulated_ledger_dir(cfg, partition), data)
        with ledger.update() as record:
            record.history = [(0.5, 0.5, 500)]
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, [train, train]))
    assert summary["status"] == "budget-exhausted"
    assert summary["rounds"] == 1
    assert not (cfg.output_path / "registry" / "versions").exists()  # nothing was learned


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedprox", "fedadam"])
def test_each_strategy_trains_and_registers_every_round(tmp_path: Path, strategy: str) -> None:
    cfg = _cfg(tmp_path, num_rounds=2, epsilon=2.0, strategy=strategy, secure_aggregation=True)
    assert cfg.secure_aggregation  # the default path
    coordinator = RoundLoop(cfg)
    initial, _ = coordinator.initial_state()
    summary = coordinator.run_rounds(InProcessGrid(cfg, 3))
    assert summary["status"] == "completed"
    versions = coordinator.registry.versions()
    assert versions == ["run-r0001", "run-r0002"]
    final, _ = coordinator.registry.load("run-r0002")
    moved = [not torch.equal(final[k], v) for k, v in initial.to_torch_state_dict().items()]
    assert all(moved)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert all(t.dtype == torch.float32 for t in final.values())
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    statuses = [r["status"] for e in events if e["event"] == "round" for r in e["replies"]]
    assert statuses == ["trained"] * 6  # round 2's updates matched round 1's global model


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("fedadam", {}), ("fedavgm", {"server_momentum": 0.9, "dp_mode": "distributed"})],
)
def test_a_resumed_run_with_a_server_optimizer_equals_an_uninterrupted_one(
    tmp_path: Path, strategy: str, extra: dict[str, Any]
) -> None:
    def cfg(name: str, stop: int = 0) -> RunConfig:
        return _cfg(
            tmp_path,
            name,
            num_rounds=3,
            epsilon=2.0,
            strategy=strategy,
            seeded_noise=True,
            stop_after_round=stop,
            **({"secure_aggregation": True} if extra else {}),
            **extra,
        )

    whole = RoundLoop(cfg("run"))
    whole.run_rounds(InProcessGrid(cfg("run"), 3))
    expected, _ = whole.registry.load("run-r0003")

    # the same run, stopped after round 1 and resumed by a new coordinator (a restart)
    RoundLoop(cfg("split", stop=1)).run_rounds(InProcessGrid(cfg("split", stop=1), 3))
    resumed = RoundLoop(cfg("split"))
    summary = resumed.run_rounds(InProcessGrid(cfg("split"), 3))
    assert summary["rounds"] == 3
    got, _ = resumed.registry.load("split-r0003")
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-5), name
    events = [json.loads(line) for line in (tmp_path / "split" / "journal.jsonl").open()]
    starts = [e for e in events if e["event"] == "start"]
    assert [s["strategy_state_restored"] for s in starts] == [False, True]


def test_a_nodes_data_error_reaches_the_coordinator_as_a_code_only(tmp_path: Path) -> None:
    """A bad cell and the institution's file path stay on the node; the journal gets a code."""
    from fedaiot.deploy.demo_data import export

    cfg = _cfg(tmp_path)
    folder = tmp_path / "st-mary-oncology-secret"
    folder.mkdir()
    path = export(cfg, 3, folder, ["alpha", "beta", "gamma"])[2]
    rows = path.read_text().splitlines()
    cells = rows[1].split(",")
    cells[0] = "Smith-4411"  # a value that must not travel
    path.write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    grid = InProcessGrid(cfg, 3)
    grid.contexts[2].node_config = {
        "data-path": str(path),
        "node-name": "gamma",
        "task": "breast-cancer",
    }
    summary = RoundLoop(cfg).run_rounds(grid)
    journal = (cfg.output_path / "journal.jsonl").read_text()
    assert "Smith" not in journal and "st-mary" not in journal and "gamma" not in journal
    events = [json.loads(line) for line in journal.splitlines()]
    replies = next(e for e in events if e["event"] == "round")["replies"]
    failed = [r for r in replies if r["status"] == "failed"]
    assert [r["problem"] for r in failed] == ["data-error"]
    assert summary["status"] == "completed"  # the two others trained


def test_the_roster_names_deployed_nodes_and_duplicate_claims_are_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)

    def impostor(message: Message, context: Context) -> Message:
        reply = train(message, context)
        reply.content["node"]["id"] = "node-0"  # claims node-0's partition
        return reply

    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, [train, train, impostor]))
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    replies = next(e for e in events if e["event"] == "round")["replies"]
    assert sorted((r["node"], r["status"]) for r in replies) == [
        ("node-0", "rejected"),
        ("node-0", "rejected"),
        ("node-1", "trained"),
    ]
    assert all("duplicate identity" in r["problem"] for r in replies if r["node"] == "node-0")
    assert [n["id"] for n in summary["nodes"]] == ["node-1"]  # no spend merged under node-0

    roster = tmp_path / "roster.json"
    roster.write_text(json.dumps({"100": "alpha", "101": "beta", "102": "gamma"}))
    named = cfg.model_copy(
        update={"node_roster": str(roster), "output_dir": str(tmp_path / "named")}
    )
    summary = RoundLoop(named).run_rounds(InProcessGrid(named, [train, train, impostor]))
    assert [n["id"] for n in summary["nodes"]] == ["alpha", "beta", "gamma"]  # claims ignored


def test_every_manifest_and_the_model_card_say_what_the_coordinator_saw(tmp_path: Path) -> None:
    from fedaiot.serving.schemas import model_card

    cfg = _cfg(tmp_path, secure_aggregation=True)
    coordinator = RoundLoop(cfg)
    coordinator.run_rounds(InProcessGrid(cfg, 3))
    card = model_card(coordinator.registry.manifest("run-r0001"))
    assert card.privacy["private"] is True
    assert card.privacy["secure_aggregation"] is True
    assert card.privacy["coordinator_saw_per_node"] == [
        "status",
        "reason code",
        "epsilon",
        "delta",
        "noise-multiplier",
    ]
    assert "sum of their weights" in " ".join(card.privacy["coordinator_saw_in_total"])
    assert all(node.examples is None for node in card.nodes)  # the weights travelled masked

    seeded = cfg.model_copy(update={"seeded_noise": True, "output_dir": str(tmp_path / "s")})
    research = RoundLoop(seeded)
    research.run_rounds(InProcessGrid(seeded, 3))
    card = model_card(research.registry.manifest("s-r0001"))
    assert card.privacy["private"] is False and card.privacy["noise"].startswith("NOT PRIVATE")


def _oversized(message: Message, context: Context) -> Message:
    reply = train(message, context)
    arrays: ArrayRecord = reply.content["arrays"]  # type: ignore[assignment]
    reply.content["arrays"] = ArrayRecord(
        {k: v + 10.0 for k, v in arrays.to_torch_state_dict().items()}
    )
    return reply


def test_an_update_past_the_bound_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_update_norm=5.0)
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, [train, train, _oversized]))
    assert summary["status"] == "completed"
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    fates = {r["node"]: (r["status"], r["problem"]) for r in events[-2]["replies"]}
    assert fates["node-0"][0] == fates["node-1"][0] == "trained"
    assert fates["node-2"][0] == "rejected" and "exceeds max-update-norm 5" in fates["node-2"][1]
