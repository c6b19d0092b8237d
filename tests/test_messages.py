"""The coordinator checks every reply before it can touch the global model."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedaiot.messages import receive, reply_content
from fedaiot.node import NodeReply

pytestmark = pytest.mark.usefixtures("flower_identity")

GLOBAL = ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(3)})


def _reply(content: RecordDict) -> Message:
    request = Message(content=RecordDict(), dst_node_id=11, message_type="train")
    return Message(content=content, reply_to=request)


def _trained(state: dict[str, torch.Tensor], examples: float = 10.0) -> Message:
    metrics = {"num-examples": examples, "epsilon": 1.0, "delta": 1e-5}
    return _reply(reply_content(NodeReply("trained", "node-3", int(examples), metrics, state)))


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


def test_a_refusal_carries_its_reason_and_no_update() -> None:
    refusal = NodeReply("refused", "node-1", 5, {"num-examples": 5.0}, reason="budget exhausted")
    reply = receive(_reply(reply_content(refusal)), GLOBAL)
    assert (reply.status, reply.problem, reply.message) == ("refused", "budget exhausted", None)


def test_malformed_and_failed_replies_are_named() -> None:
    bare = receive(_reply(RecordDict({"metrics": MetricRecord({"num-examples": 1.0})})), GLOBAL)
    assert bare.status == "rejected"
    assert "malformed reply" in bare.problem
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    failed = receive(Message(Error(code=0, reason="client crashed"), reply_to=request), GLOBAL)
    assert (failed.status, failed.node, failed.problem) == ("failed", "node 5", "client crashed")
    no_arrays = _reply(
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 3.0}),
                "node": ConfigRecord({"id": "node-2", "status": "trained", "reason": ""}),
            }
        )
    )
    assert "no arrays" in receive(no_arrays, GLOBAL).problem
