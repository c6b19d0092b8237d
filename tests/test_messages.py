"""The coordinator checks every reply before it can touch the global model."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedaiot.wire.records import receive, refuse_duplicates, reply_content
from fedaiot.wire.replies import NodeReply

pytestmark = pytest.mark.usefixtures("flower_identity")

GLOBAL = ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(3)})


def _reply(content: RecordDict, node: int = 11) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=request)  # from node ``node``


def _trained(state: dict[str, torch.Tensor], examples: float = 10.0) -> Message:
    metrics = {"num-examples": examples, "epsilon": 1.0, "delta": 1e-5, "train-seconds": 2.0}
    reply = NodeReply("trained", "node-3", examples, metrics, state)
    return _reply(reply_content(reply, private=True))


def test_a_good_update_is_accepted() -> None:
    reply = receive(_trained({"w": torch.ones(3, 2), "b": torch.ones(3)}), GLOBAL)
    assert (reply.status, reply.node, reply.problem) == ("trained", "node-3", "")
    assert reply.metrics["epsilon"] == 1.0


@pytest.mark.parametrize(
    ("state", "examples", "problem"),
    [
        ({"w": torch.ones(2, 3), "b": torch.ones(3)}, 10.0, "wrong shape for w"),
        ({"w": torch.ones(3, 2)}, 10.0, "missing tensors ['b']"),
        ({"w": torch.ones(3, 2), "b": torch.ones(3), "x": torch.ones(1)}, 10.0, "unexpected ['x']"),
        ({"w": torch.full((3, 2), math.nan), "b": torch.ones(3)}, 10.0, "NaN"),
        ({"w": torch.ones(3, 2), "b": torch.tensor([1, 2, math.inf])}, 10.0, "NaN or infinity"),
        ({"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(3)}, 10.0, "wrong dtype"),
        ({"w": torch.ones(3, 2), "b": torch.ones(3)}, 0.0, "num-examples"),
        ({"w": torch.ones(3, 2), "b": torch.ones(3)}, 2.5, "num-examples"),
    ],
)
def test_a_bad_update_is_rejected_with_its_reason(
    state: dict[str, torch.Tensor], examples: float, problem: str
) -> None:
    reply = receive(_trained(state, examples), GLOBAL)
    assert reply.status == "rejected"
    assert reply.message is None
    assert problem in reply.problem


def test_only_the_modes_clear_metrics_leave_the_node() -> None:
    metrics = {"num-examples": 77.0, "epsilon": 1.0, "delta": 1e-5, "noise-multiplier": 2.0}
    local = {"train-loss": 0.3, "train-seconds": 4.2, "examples": 75.0}
    reply = NodeReply("trained", "node-3", 77.0, {**metrics, **local}, {"b": torch.ones(3)})
    sent = reply_content(reply, private=True).metric_records["metrics"]
    assert dict(sent) == metrics  # the noisy count, the accounting: no loss, no time
    secure = reply_content(reply, private=True, secure=True)
    assert set(secure.metric_records["metrics"]) == {"epsilon", "delta", "noise-multiplier"}
    assert "arrays" not in secure.array_records  # under secure aggregation the update is masked


def test_a_refusal_carries_a_code_no_count_and_no_update() -> None:
    refusal = NodeReply(
        "refused",
        "node-1",
        0.0,
        {"epsilon": 0.9, "delta": 1e-5, "num-examples": 55.0, "examples": 55.0},
        reason="budget-exhausted",
        detail="spent 0.9 of 1.0 on /data/hospital-a.csv",
    )
    content = reply_content(refusal, private=True)
    assert dict(content.metric_records["metrics"]) == {"epsilon": 0.9, "delta": 1e-5}
    assert "hospital" not in str(dict(content.config_records["node"]))
    reply = receive(_reply(content), GLOBAL)
    assert (reply.status, reply.problem, reply.message) == ("refused", "budget-exhausted", None)


def test_a_reason_that_is_no_code_is_not_repeated() -> None:
    content = RecordDict(
        {
            "metrics": MetricRecord({}),
            "node": ConfigRecord({"id": "", "status": "failed", "reason": "bad cell 'Smith'"}),
        }
    )
    reply = receive(_reply(content), GLOBAL)
    assert reply.status == "failed" and "Smith" not in reply.problem


def test_two_nodes_under_one_identity_are_both_rejected() -> None:
    state = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    first = receive(_trained(state), GLOBAL)
    second = receive(_reply(_trained(state).content, node=12), GLOBAL)
    third = receive(
        _reply(
            reply_content(
                NodeReply("trained", "node-4", 5.0, {"num-examples": 5.0}, state), private=True
            ),
            node=13,
        ),
        GLOBAL,
    )
    checked = refuse_duplicates([first, second, third])
    assert [r.status for r in checked] == ["rejected", "rejected", "trained"]
    assert all(r.message is None for r in checked[:2])
    assert "duplicate identity: 2 nodes answered as node-3" in checked[0].problem


def test_a_roster_names_nodes_by_their_authenticated_id_not_their_claim() -> None:
    state = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    reply = receive(_trained(state), GLOBAL, roster={11: "alpha"})
    assert reply.node == "alpha"  # the reply claimed node-3
    stranger = receive(_reply(_trained(state).content, node=99), GLOBAL, roster={11: "alpha"})
    assert stranger.node == "unregistered node 99"


def test_malformed_and_failed_replies_are_named() -> None:
    bare = receive(_reply(RecordDict({"metrics": MetricRecord({"num-examples": 1.0})})), GLOBAL)
    assert bare.status == "rejected"
    assert "malformed reply" in bare.problem
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    error = Message(Error(code=0, reason="client crashed on row 'Smith'"), reply_to=request)
    failed = receive(error, GLOBAL)
    assert (failed.status, failed.node) == ("failed", "node 5")
    assert "Smith" not in failed.problem  # Flower's error text may quote the node's data
    no_arrays = _reply(
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 3.0}),
                "node": ConfigRecord({"id": "node-2", "status": "trained", "reason": ""}),
            }
        )
    )
    assert "no arrays" in receive(no_arrays, GLOBAL).problem
