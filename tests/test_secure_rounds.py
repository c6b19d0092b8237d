"""Secure aggregation through the coordinator and the real ClientApp handlers, in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedaiot.config.run import RunConfig
from fedaiot.rounds.loop import RoundLoop
from fedaiot.simulation.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


def _cfg(tmp_path: Path, name: str, **overrides: Any) -> RunConfig:
    # two of five may collude: the complete graph, threshold 3
    fields = {
        "task": "breast-cancer",
        "num_rounds": 1,
        "epsilon": 2.0,
        "min_available_nodes": 5,
        "secagg_collusion": 0.4,
    }
    return RunConfig(**{**fields, **overrides}, output_dir=str(tmp_path / name))


def _round_one(cfg: RunConfig, grid: InProcessGrid) -> tuple[dict[str, torch.Tensor], dict]:
    coordinator = RoundLoop(cfg)
    coordinator.run_rounds(grid)
    weights, _ = coordinator.registry.load(coordinator.registry.versions()[-1])
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    return weights, next(e for e in events if e["event"] == "round")


def test_secure_model_equals_plain_fedavg_up_to_quantisation(tmp_path: Path) -> None:
    # the same noise in both runs (seeded, research only), so that only aggregation differs
    plain_cfg = _cfg(tmp_path, "plain", secure_aggregation=False, seeded_noise=True)
    plain, _ = _round_one(plain_cfg, InProcessGrid(plain_cfg, 5))
    cfg = _cfg(tmp_path, "secure", seeded_noise=True)
    secure, event = _round_one(cfg, InProcessGrid(cfg, 5))
    assert event["secure_aggregation"]["error"] == ""
    assert event["secure_aggregation"]["dropped"] == {}
    chosen = event["secure_aggregation"]["parameters"]  # the threat model and its (k, t)
    assert (chosen["n"], chosen["collusion"], chosen["dropout"]) == (5, 0.4, 0.1)
    assert chosen["security_bits"] == 40 and chosen["threshold"] > (chosen["degree"] + 1) / 2
    assert all(r["status"] == "trained" for r in event["replies"])
    # under secure aggregation nodes report no example counts and no training loss
    assert all(r["examples"] is None for r in event["replies"])
    # 24 fractional bits: each weighted coordinate is off by <= 2^-25, n of them, / total weight
    for name, tensor in plain.items():
        assert torch.allclose(secure[name], tensor, atol=1e-6, rtol=0), name
        assert not torch.equal(secure[name], torch.zeros_like(tensor))


def test_a_node_dropping_after_key_sharing_is_left_out_and_the_round_completes(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "drop")
    grid = InProcessGrid(cfg, 5, overrides={(3, "train.secagg"): _lost_after_training})
    _, event = _round_one(cfg, grid)
    statuses = {r["node"]: r["status"] for r in event["replies"]}
    assert statuses == {"node-0": "trained", "node-1": "trained", "node-2": "trained",
                        "node-4": "trained"}  # fmt: skip
    assert event["secure_aggregation"]["error"] == ""
    assert "no masked input" in event["secure_aggregation"]["dropped"]["node-3"]


def _lost_after_training(message: Any, context: Any) -> None:
    """A node that is charged and trains, then is gone before its masked input leaves."""
    from clients import client_app
    from fedaiot.secure_rounds import handlers

    handlers.ready_to_mask(message.content, context)
    client_app._train(message, context, released_on_return=False, survivors=None)


def test_a_run_none_of_whose_rounds_aggregated_fails_and_registers_nothing(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "fail", num_rounds=2)
    gone = {(i, "train.secagg"): _lost_after_training for i in (0, 1, 2)}  # 2 of 5 left, t 3
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=gone))
    assert summary["status"] == "no-aggregate"
    assert "no round aggregated any update" in summary["error"]
    assert "threshold" in summary["error"]
    assert summary["rounds"] == 2 and summary["aggregated_rounds"] == 0
    assert summary["model_version"] is None
    assert not (cfg.output_path / "registry" / "versions").exists()  # nothing registered
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["aggregated"] for e in rounds] == [False, False]
    assert [r["status"] for r in rounds[0]["replies"]] == ["dropped"] * 2
    # the two nodes that sent masked inputs spent their budget; the three whose update never
    # left them were charged too, and each got round 1's charge back when round 2 came
    assert len(summary["nodes"]) == 2  # the three never answered: nothing reached the journal
    assert all(n["epsilon"] > 0 and n["rounds"] == 0 for n in summary["nodes"])
    ledgers = [
        json.loads(p.read_text()) for p in (cfg.output_path / "ledgers").rglob("ledger-*.json")
    ]
    fates = sorted(
        (e["round"], e["released"], e["refunded"]) for ledger in ledgers for e in ledger["rounds"]
    )
    assert fates == [
        *[(1, False, True)] * 3,  # masked input never sent: returned when round 2 came
        *[(1, True, False)] * 2,
        *[(2, False, False)] * 3,  # no round 3 came to return them: they stay charged
        *[(2, True, False)] * 2,
    ]
    assert events[-1] == {"event": "end", "status": "no-aggregate", "error": summary["error"]}


def test_a_round_without_an_aggregate_keeps_the_model_and_is_not_registered(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "gap", num_rounds=2)
    gone = {(i, "train.secagg"): None for i in (0, 1, 2)}
    coordinator = RoundLoop(cfg)
    failing = InProcessGrid(cfg, 5, overrides=gone)
    calls = {"n": 0}
    real = failing.send_and_receive

    def first_round_fails(messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train.secagg":
            calls["n"] += 1
            if calls["n"] == 2:
                failing.overrides.clear()  # round 2: everyone answers
        return real(messages, timeout=timeout)

    failing.send_and_receive = first_round_fails  # type: ignore[method-assign]
    summary = coordinator.run_rounds(failing)
    assert summary["status"] == "completed"
    assert coordinator.registry.versions() == ["gap-r0002"]
    assert summary["aggregated_rounds"] == 1


def test_replayed_and_wrong_length_inputs_are_rejected_with_their_reason(tmp_path: Path) -> None:
    from clients import client_app
    from fedaiot.secure_rounds.wire import SECAGG_ARRAYS

    cfg = _cfg(tmp_path, "tamper", num_rounds=2)
    recorded: list = []

    def replaying(message, context):  # type: ignore[no-untyped-def]
        reply = client_app.train_and_mask(message, context)
        recorded.append(reply.content)
        if len(recorded) > 1:  # round 2: send round 1's masked input again
            return type(reply)(content=recorded[0], reply_to=message)
        return reply

    def truncating(message, context):  # type: ignore[no-untyped-def]
        from flwr.app import Array, ArrayRecord

        reply = client_app.train_and_mask(message, context)
        vector = reply.content.array_records[SECAGG_ARRAYS]["vector"].numpy()
        reply.content[SECAGG_ARRAYS] = ArrayRecord({"vector": Array(vector[:-1].copy())})
        return reply

    overrides = {(1, "train.secagg"): replaying, (2, "train.secagg"): truncating}
    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=overrides))
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    first, second = (e for e in events if e["event"] == "round")
    assert "expects" in first["secure_aggregation"]["dropped"]["node-2"]
    assert "node-1" not in first["secure_aggregation"]["dropped"]
    assert "replayed" in second["secure_aggregation"]["dropped"]["node-1"]
    assert first["secure_aggregation"]["error"] == second["secure_aggregation"]["error"] == ""
    statuses = {r["node"]: r["status"] for r in second["replies"]}
    assert statuses["node-1"] == statuses["node-2"] == "dropped"
    assert statuses["node-0"] == "trained"


def test_too_few_nodes_for_secure_aggregation_fail_the_run_clearly(tmp_path: Path) -> None:
    from fedaiot.config.run import ConfigError

    cfg = _cfg(tmp_path, "two", min_available_nodes=2)
    with pytest.raises(ConfigError, match="at least 3 nodes in a round, 2 were sampled"):
        RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 2))


def test_flatten_follows_the_global_models_key_order() -> None:
    from flwr.app import ArrayRecord

    from fedaiot.secure_rounds.wire import flatten, unflatten

    forward = ArrayRecord({"a": torch.zeros(2), "b": torch.ones(3)})
    backward = ArrayRecord({"b": torch.ones(3), "a": torch.zeros(2)})  # same model, other order
    assert (flatten(backward, order=forward) == flatten(forward)).all()
    assert not (flatten(backward) == flatten(forward)).all()
    rebuilt = unflatten(flatten(backward, order=forward), forward)
    assert list(rebuilt.keys()) == ["a", "b"]


def test_nodes_of_different_sizes_send_identical_clear_metadata(tmp_path: Path) -> None:
    """Under secure aggregation, what a node sends in the clear is a function of the budget
    and the coordinator's settings: nothing in it tells a large data set from a small one."""
    from clients import client_app
    from fedaiot.node.round import simulated_partition
    from fedaiot.secure_rounds.wire import SECAGG, SECAGG_ARRAYS

    cfg = _cfg(tmp_path, "sizes", partitioner="dirichlet", dirichlet_alpha=0.3)
    sizes = [len(simulated_partition(cfg, i, 5)) for i in range(5)]
    assert max(sizes) > 2 * min(sizes)
    seen: dict[int, Any] = {}

    def recording(index: int):  # type: ignore[no-untyped-def]
        def handler(message, context):  # type: ignore[no-untyped-def]
            reply = client_app.train_and_mask(message, context)
            seen[index] = reply.content
            return reply

        return handler

    overrides = {(i, "train.secagg"): recording(i) for i in range(5)}
    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=overrides))
    small, large = seen[sizes.index(min(sizes))], seen[sizes.index(max(sizes))]
    assert dict(small.metric_records["metrics"]) == dict(large.metric_records["metrics"])
    assert set(small.metric_records["metrics"]) == {"epsilon", "delta", "noise-multiplier"}
    clear = {name: dict(record) for name, record in small.config_records.items()}
    assert set(clear) == {"node", SECAGG}
    assert set(clear[SECAGG]) == {"node_id", "round_id"}
    # the update and the count travel only inside the masked vector, integers mod 2^64
    assert set(small.array_records) == {SECAGG_ARRAYS}
    masked = small.array_records[SECAGG_ARRAYS]
    assert list(masked) == ["vector"] and masked["vector"].numpy().dtype == "uint64"


def test_a_refusal_under_secure_aggregation_carries_no_count(tmp_path: Path) -> None:
    from clients import client_app
    from fedaiot.node.round import simulated_ledger_dir, simulated_partition
    from fedaiot.privacy.ledger import PrivacyLedger

    cfg = _cfg(tmp_path, "refusal")
    ledger = PrivacyLedger.for_data(simulated_ledger_dir(cfg, 4), simulated_partition(cfg, 4, 5))
    with ledger.update() as record:
        record.history = [(0.5, 0.5, 500)]  # node-4's data was spent by another study
    seen = {}

    def recording(message, context):  # type: ignore[no-untyped-def]
        reply = client_app.train_and_mask(message, context)
        seen["reply"] = reply.content
        return reply

    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides={(4, "train.secagg"): recording}))
    refusal = seen["reply"]
    assert dict(refusal.config_records["node"])["status"] == "refused"
    assert set(refusal.metric_records["metrics"]) == {"epsilon", "delta"}
    assert not refusal.array_records


def _unbounded(handler: Any) -> Any:
    """A malicious node: it trains, then pushes its update far past the bound, unclipped."""
    import fedaiot.node.round as node_round

    def scaled(start: dict, state: dict, bound: float) -> dict:
        return {k: start[k] + 1e3 * (state[k] - start[k]) + 1.0 for k in state}

    def run(message: Any, context: Any) -> Any:
        honest = node_round.bound_update
        node_round.bound_update = scaled  # type: ignore[assignment]
        try:
            return handler(message, context)
        finally:
            node_round.bound_update = honest

    return run


def test_a_sum_no_honest_nodes_could_make_is_discarded_not_applied(tmp_path: Path) -> None:
    from clients.client_app import train_and_mask

    # the coordinator sees only the sum, but the sum betrays an unbounded update
    cfg = _cfg(tmp_path, "attacked", num_rounds=2, max_update_norm=5.0)
    attacked = {(4, "train.secagg"): _unbounded(train_and_mask)}
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=attacked))
    assert summary["status"] == "no-aggregate" and summary["aggregated_rounds"] == 0
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    errors = [e["secure_aggregation"]["error"] for e in events if e["event"] == "round"]
    assert len(errors) == 2 and all("implausible aggregate" in e for e in errors)
    # the same five honest nodes aggregate: the bound is not what stopped the round
    honest_cfg = _cfg(tmp_path, "honest", max_update_norm=5.0)
    assert RoundLoop(honest_cfg).run_rounds(InProcessGrid(honest_cfg, 5))["status"] == "completed"


def test_more_weight_than_the_survivors_may_carry_is_implausible() -> None:
    import numpy as np

    from fedaiot.secure_rounds.driver import implausible

    small = np.full(10, 0.1)
    assert implausible(small, 3 * 500.0, 3, max_norm=1.0, max_weight=500.0) == ""
    assert "total weight of 1600 from 3 nodes" in implausible(small, 1600.0, 3, 1.0, 500.0)
    assert "norm is 3.162" in implausible(small * 10, 30.0, 3, 1.0, 500.0)
    assert implausible(np.array([np.nan]), 30.0, 3, 1.0, 500.0)
