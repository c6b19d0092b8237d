"""How a node's reply travels in a Flower message, and how the coordinator checks it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedaiot.node import NodeReply

ARRAYS, METRICS, NODE = "arrays", "metrics", "node"


def reply_content(reply: NodeReply) -> RecordDict:
    content = RecordDict(
        {
            METRICS: MetricRecord(dict(reply.metrics)),
            NODE: ConfigRecord({"id": reply.node, "status": reply.status, "reason": reply.reason}),
        }
    )
    if reply.state is not None:
        content[ARRAYS] = ArrayRecord(reply.state)
    return content


@dataclass(frozen=True)
class ReceivedReply:
    """A node's reply as the coordinator sees it; ``problem`` is set when it was rejected."""

    node: str
    status: str  # "trained", "refused", "rejected" or "failed"
    metrics: dict[str, float]
    message: Message | None
    problem: str = ""


def read_reply(message: Message) -> ReceivedReply:
    """Who replied, with what status, metrics and reason; the update itself is not checked.

    An error reply is "failed" and a reply without the node's record or metrics "rejected"
    (both without ``message``); otherwise the status is the node's own and ``message`` is set.
    """
    source = f"node {message.metadata.src_node_id}"
    if message.has_error():
        return ReceivedReply(source, "failed", {}, None, message.error.reason or "failed")
    content = message.content
    try:
        info = content.config_records[NODE]
        metrics = {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]
        node, status = str(info["id"]), str(info["status"])
    except (KeyError, TypeError, ValueError) as exc:
        return ReceivedReply(source, "rejected", {}, None, f"malformed reply: missing {exc}")
    return ReceivedReply(node, status, metrics, message, str(info.get("reason", "")))


def receive(message: Message, reference: ArrayRecord) -> ReceivedReply:
    """Classify one reply; an update that could corrupt the global model is rejected here."""
    reply = read_reply(message)
    if reply.message is None:
        return reply
    if reply.status == "refused":
        return replace(reply, message=None)
    problem = _update_problem(message.content, reply.metrics, reference)
    if problem:
        return ReceivedReply(
            reply.node, "rejected", reply.metrics, None, f"{reply.node}: {problem}"
        )
    return ReceivedReply(reply.node, "trained", reply.metrics, message)


def _update_problem(content: RecordDict, metrics: dict[str, float], reference: ArrayRecord) -> str:
    if ARRAYS not in content.array_records:
        return "malformed update: no arrays in a 'trained' reply"
    examples = metrics.get("num-examples", math.nan)
    if not (math.isfinite(examples) and examples > 0 and examples == int(examples)):
        return f"malformed update: num-examples must be a positive integer, got {examples}"
    arrays = content.array_records[ARRAYS]
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or extra:
        return f"malformed update: missing tensors {sorted(missing)}, unexpected {sorted(extra)}"
    for name, expected in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape):
            return f"wrong shape for {name}: {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"wrong dtype for {name}: {got.dtype}, expected {expected.dtype}"
        if not np.isfinite(got.numpy()).all():
            return f"non-finite values (NaN or infinity) in {name}"
    return ""
