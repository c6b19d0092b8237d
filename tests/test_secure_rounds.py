"""Secure aggregation through the coordinator and the real ClientApp handlers, in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedaiot.config import RunConfig
from fedaiot.coordinator import Coordinator
from tests.inprocess_grid import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


def _cfg(tmp_path: Path, name: str, **overrides: Any) -> RunConfig:
    fields = {"task": "breast-cancer", "num_rounds": 1, "epsilon": 2.0, "min_available_nodes": 5}
    return RunConfig(**{**fields, **overrides}, output_dir=str(tmp_path / name))


def _round_one(cfg: RunConfig, grid: InProcessGrid) -> tuple[dict[str, torch.Tensor], dict]:
    coordinator = Coordinator(cfg)
    coordinator.run_rounds(grid)
    weights, _ = coordinator.registry.load(coordinator.registry.versions()[-1])
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    return weights, next(e for e in events if e["event"] == "round")


def test_secure_model_equals_plain_fedavg_up_to_quantisation(tmp_path: Path) -> None:
    plain, _ = _round_one(
        _cfg(tmp_path, "plain", secure_aggregation=False),
        InProcessGrid(_cfg(tmp_path, "plain", secure_aggregation=False), 5),
    )
    cfg = _cfg(tmp_path, "secure")
    secure, event = _round_one(cfg, InProcessGrid(cfg, 5))
    assert event["secure_aggregation"] == {"error": "", "dropped": {}}
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
    grid = InProcessGrid(cfg, 5, overrides={(3, "query.secagg_mask"): None})
    _, event = _round_one(cfg, grid)
    statuses = {r["node"]: r["status"] for r in event["replies"]}
    assert statuses == {
        "node-0": "trained",
        "node-1": "trained",
        "node-2": "trained",
        "node-3": "dropped",
        "node-4": "trained",
    }
    assert event["secure_aggregation"]["error"] == ""
    assert "no masked input" in event["secure_aggregation"]["dropped"]["node-3"]


def test_below_threshold_the_round_fails_and_the_model_is_kept(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "fail", num_rounds=2)
    gone = {(i, "query.secagg_mask"): None for i in (0, 1, 2)}  # 2 of 5 left, threshold 4
    coordinator = Coordinator(cfg)
    initial, _ = coordinator.initial_state()
    summary = coordinator.run_rounds(InProcessGrid(cfg, 5, overrides=gone))
    assert summary["rounds"] == 2
    kept, _ = coordinator.registry.load("fail-r0002")
    for name, tensor in initial.to_torch_state_dict().items():
        assert torch.equal(kept[name], tensor)
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    error = events[1]["secure_aggregation"]["error"]
    assert "threshold" in error
    assert all(r["status"] == "dropped" for r in events[1]["replies"])
    # every node still spent its privacy on the rounds it trained
    assert all(n["epsilon"] > 0 and n["rounds"] == 0 for n in summary["nodes"])


def test_replayed_and_wrong_length_inputs_are_rejected_with_their_reason(tmp_path: Path) -> None:
    from clients import client_app
    from fedaiot.secure_wire import SECAGG_ARRAYS

    cfg = _cfg(tmp_path, "tamper", num_rounds=2)
    recorded: list = []

    def replaying(message, context):  # type: ignore[no-untyped-def]
        reply = client_app.masked_input(message, context)
        recorded.append(reply.content)
        if len(recorded) > 1:  # round 2: send round 1's masked input again
            return type(reply)(content=recorded[0], reply_to=message)
        return reply

    def truncating(message, context):  # type: ignore[no-untyped-def]
        from flwr.app import Array, ArrayRecord

        reply = client_app.masked_input(message, context)
        vector = reply.content.array_records[SECAGG_ARRAYS]["vector"].numpy()
        reply.content[SECAGG_ARRAYS] = ArrayRecord({"vector": Array(vector[:-1].copy())})
        return reply

    overrides = {(1, "query.secagg_mask"): replaying, (2, "query.secagg_mask"): truncating}
    Coordinator(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=overrides))
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
    from fedaiot.config import ConfigError

    cfg = _cfg(tmp_path, "two", min_available_nodes=2)
    with pytest.raises(ConfigError, match="at least 3 nodes in a round, 2 were sampled"):
        Coordinator(cfg).run_rounds(InProcessGrid(cfg, 2))


def test_flatten_follows_the_global_models_key_order() -> None:
    from flwr.app import ArrayRecord

    from fedaiot.secure_wire import flatten, unflatten

    forward = ArrayRecord({"a": torch.zeros(2), "b": torch.ones(3)})
    backward = ArrayRecord({"b": torch.ones(3), "a": torch.zeros(2)})  # same model, other order
    assert (flatten(backward, order=forward) == flatten(forward)).all()
    assert not (flatten(backward) == flatten(forward)).all()
    rebuilt = unflatten(flatten(backward, order=forward), forward)
    assert list(rebuilt.keys()) == ["a", "b"]
