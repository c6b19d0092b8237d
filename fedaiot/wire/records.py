"""How a node's reply travels in a Flower message, and how the coordinator checks it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedaiot.wire.packing import unreadable
from fedaiot.wire.replies import (
    CONTRIBUTED,
    FAILED,
    REASONS,
    REFUSED,
    TRAINED,
    NodeReply,
    clear_metrics,
)

ARRAYS, METRICS, NODE, VECTOR = "arrays", "metrics", "node", "vector"


def wire_mode(status: str, *, private: bool, secure: bool) -> str:
    """Which list of :data:`fedaiot.wire.replies.CLEAR_METRICS` a reply of ``status`` may use."""
    if status == CONTRIBUTED:
        return CONTRIBUTED
    if status != TRAINED:
        return REFUSED if status == REFUSED else FAILED
    return ("private" if private else "non-private") + ("-secure" if secure else "")


def reply_content(reply: NodeReply, *, private: bool, secure: bool = False) -> RecordDict:
    """The reply as Flower records: the clear metrics of its mode, the status, a reason code,
    and the update itself only for a trained reply without secure aggregation."""
    mode = wire_mode(reply.status, private=private, secure=secure)
    content = RecordDict(
        {
            METRICS: MetricRecord(clear_metrics(mode, reply.metrics)),  # type: ignore[arg-type]
            NODE: ConfigRecord({"id": reply.node, "status": reply.status, "reason": reply.reason}),
        }
    )
    if reply.state is not None and reply.status == TRAINED and not secure:
        content[ARRAYS] = ArrayRecord(reply.state)
    if reply.vector is not None and reply.status == CONTRIBUTED and not secure:
        content[ARRAYS] = ArrayRecord({VECTOR: Array(np.asarray(reply.vector, dtype=np.float64))})
    return content


def read_vector(message: Message, length: int) -> np.ndarray | str:
    """A plain vector reply's vector, or why it cannot be summed."""
    try:
        vector = message.content.array_records[ARRAYS][VECTOR].numpy()
    except KeyError:
        return "malformed reply: no vector"
    if vector.shape != (length,):
        return f"vector of shape {vector.shape}, the release expects ({length},)"
    if not np.isfinite(vector).all():
        return "non-finite values in the vector"
    return vector.astype(np.float64)


@dataclass(frozen=True)
class ReceivedReply:
    """A node's reply as the coordinator sees it; ``problem`` is set when it was rejected."""

    node: str
    status: str  # "trained", "refused", "rejected", "failed" or "dropped"
    metrics: dict[str, float]
    message: Message | None
    problem: str = ""
    source: int = 0  # the Flower node id the SuperLink delivered it from


def identity(message: Message, claimed: str, roster: Mapping[int, str]) -> str:
    """Who a reply is from: the roster's name for the authenticated Flower node id; without a
    roster, the partition a simulated node reports; else the Flower node id."""
    source = message.metadata.src_node_id
    if roster:
        return roster.get(source, f"unregistered node {source}")
    return claimed or f"node {source}"


def read_reply(message: Message, roster: Mapping[int, str] | None = None) -> ReceivedReply:
    """Who replied, with what status, metrics and reason; the update itself is not checked.

    An error reply is "failed" and a reply without the node's record or metrics "rejected"
    (both without ``message``); otherwise the status is the node's own and ``message`` is set.
    A reason that is not one of the codes is not repeated (it could carry the node's data).
    """
    roster = roster or {}
    source = message.metadata.src_node_id
    if message.has_error():
        name = identity(message, "", roster)
        return ReceivedReply(name, FAILED, {}, None, "the node's app raised an error", source)
    content = message.content
    why = unreadable(content)
    if why:
        name = identity(message, "", roster)
        return ReceivedReply(name, "rejected", {}, None, f"unreadable reply: {why}", source)
    try:
        info = content.config_records[NODE]
        metrics = {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]
        claimed, status = str(info["id"]), str(info["status"])
    except (KeyError, TypeError, ValueError) as exc:
        name = identity(message, "", roster)
        return ReceivedReply(name, "rejected", {}, None, f"malformed reply: missing {exc}", source)
    reason = str(info.get("reason", ""))
    problem = reason if reason in REASONS else ("unknown reason code" if reason else "")
    name = identity(message, claimed, roster)
    return ReceivedReply(name, status, metrics, message, problem, source)


def receive(
    message: Message,
    reference: ArrayRecord,
    roster: Mapping[int, str] | None = None,
    *,
    max_norm: float = math.inf,
    max_weight: float = math.inf,
) -> ReceivedReply:
    """Classify one reply; an update that could corrupt the global model is rejected here:
    malformed, non-finite, changing the model by more than ``max_norm`` (honest nodes bound
    their own) or weighing more than ``max_weight``."""
    reply = read_reply(message, roster)
    if reply.message is None:
        return reply
    if reply.status != TRAINED:
        return replace(reply, message=None)
    problem = _update_problem(message.content, reply.metrics, reference) or _out_of_bounds(
        message.content.array_records[ARRAYS], reply.metrics, reference, max_norm, max_weight
    )
    if problem:
        return replace(reply, status="rejected", message=None, problem=f"{reply.node}: {problem}")
    return reply


def refuse_duplicates(replies: list[ReceivedReply]) -> list[ReceivedReply]:
    """Replies from two or more Flower nodes under one identity are all rejected, their
    accounting dropped: neither can be told from the other, and recording both under one
    name would merge two institutions' privacy spend into one line."""
    sources: dict[str, set[int]] = {}
    for reply in replies:
        sources.setdefault(reply.node, set()).add(reply.source)
    return [
        replace(
            r,
            status="rejected",
            metrics={},
            message=None,
            problem=f"duplicate identity: {len(sources[r.node])} nodes answered as {r.node}",
        )
        if len(sources[r.node]) > 1
        else r
        for r in replies
    ]


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


def _out_of_bounds(
    arrays: ArrayRecord,
    metrics: dict[str, float],
    reference: ArrayRecord,
    max_norm: float,
    max_weight: float,
) -> str:
    if metrics["num-examples"] > max_weight:
        return f"weight {metrics['num-examples']:.0f} exceeds the {max_weight:g} one node may carry"
    if math.isinf(max_norm):
        return ""
    squares = sum(
        float(((arrays[k].numpy().astype(np.float64) - v.numpy()) ** 2).sum())
        for k, v in reference.items()
    )
    norm = math.sqrt(squares)
    if norm > max_norm * (1 + 1e-3) + 1e-4:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}"
    return ""
