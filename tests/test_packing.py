"""A message's content travels as one record: the same records, read back exactly, and a
packed content that cannot be read is refused, never trusted (fedaiot.wire.packing)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedaiot.config.polling import Polling
from fedaiot.rounds.exchanges import ReplyLoop
from fedaiot.wire.packing import (
    PACKED,
    PackingError,
    pack_content,
    packed,
    packed_messages,
    unpack_content,
)
from fedaiot.wire.records import receive, reply_content
from fedaiot.wire.replies import NodeReply

pytestmark = pytest.mark.usefixtures("flower_identity")

MODEL = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4), "a.first": torch.randn(2)}


def test_a_content_comes_back_exactly_in_its_own_order() -> None:
    arrays = {
        "z": np.arange(6, dtype=np.float32).reshape(2, 3),
        "masked": np.array([2**63 + 5, 7], dtype=np.uint64),  # SecAgg's Z_2^64 values
        "a": np.array([-1, 3], dtype=np.int64),
        "scalar": np.array(1.5, dtype=np.float64),
    }
    config = {"i": 2**62, "f": 0.5, "b": True, "s": "x", "raw": b"\x00\xff", "ids": [3, 1]}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord(config),  # type: ignore[arg-type]
            "metrics": MetricRecord({"n": 5, "loss": 0.25}),
        }
    )
    wire = pack_content(content)
    assert list(wire.keys()) == [PACKED] and isinstance(wire[PACKED], ConfigRecord)
    back = unpack_content(wire)
    assert list(back.keys()) == ["arrays", "config", "metrics"]
    assert list(back.array_records["arrays"].keys()) == list(arrays)
    for name, value in arrays.items():
        got = back.array_records["arrays"][name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        assert np.array_equal(got, value)
    got_config = dict(back.config_records["config"])
    assert got_config == config and [type(v) for v in got_config.values()] == [
        type(v) for v in config.values()
    ]  # an int stays an int, a bool a bool
    assert dict(back.metric_records["metrics"]) == {"n": 5, "loss": 0.25}
    assert unpack_content(content) is content  # a content that was not packed is left as it is


def test_a_packed_content_is_three_objects_on_the_wire() -> None:
    content = RecordDict({"arrays": ArrayRecord(MODEL), "config": ConfigRecord({"r": 1})})
    before, after = get_all_nested_objects(content), get_all_nested_objects(pack_content(content))
    assert len(before) == 9 and len(after) == 2  # the message itself makes the third
    state = unpack_content(pack_content(content)).array_records["arrays"].to_torch_state_dict()
    assert list(state) == list(MODEL) and all(torch.equal(state[k], v) for k, v in MODEL.items())


def test_a_content_too_large_for_one_request_goes_as_flowers_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedaiot.wire import packing

    monkeypatch.setattr(packing, "MAX_PACKED_BYTES", 100)
    content = RecordDict({"arrays": ArrayRecord(MODEL)})
    assert pack_content(content) is content


@pytest.mark.parametrize(
    "record, why",
    [
        (ConfigRecord({"records": b"\xff\xff\xff not protobuf"}), "not a Flower RecordDict"),
        (ConfigRecord({"records": "text"}), "must be a ConfigRecord of 'records' bytes"),
        (ConfigRecord({"records": b"", "extra": 1}), "must be a ConfigRecord of 'records' bytes"),
        (MetricRecord({"records": 1.0}), "must be a ConfigRecord of 'records' bytes"),
    ],
)
def test_an_unreadable_content_is_refused_with_the_reason(record: Any, why: str) -> None:
    with pytest.raises(PackingError, match=why):
        unpack_content(RecordDict({PACKED: record}))


def test_a_content_packed_twice_is_refused() -> None:
    twice = pack_content(RecordDict({"c": ConfigRecord({"x": 1})}))
    inner = RecordDict({PACKED: twice[PACKED], "other": ConfigRecord({"y": 2})})
    with pytest.raises(PackingError, match="packed twice"):
        unpack_content(pack_content(inner))


def _request(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=11, message_type="train")


def test_a_node_answers_packed_only_when_asked_packed() -> None:
    seen: list[RecordDict] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        reply = NodeReply("trained", "node-1", 5.0, {"num-examples": 5.0}, dict(MODEL))
        return Message(content=reply_content(reply, private=False), reply_to=msg)

    context: Any = None
    content = RecordDict({"arrays": ArrayRecord(MODEL), "config": ConfigRecord({"r": 1})})
    reply = packed_messages(_request(pack_content(content)), context, handler)
    assert list(seen[0].array_records["arrays"].keys()) == list(MODEL)  # the handler's view
    assert packed(reply)
    reply = packed_messages(_request(content), context, handler)  # a stock coordinator
    assert not packed(reply) and list(reply.content.array_records["arrays"]) == list(MODEL)


class EchoGrid(ReplyLoop):
    """Each message is answered at once, by ``answer``, as a node's reply."""

    def __init__(self, answer: Any) -> None:
        super().__init__(self, Polling(results=0.001))  # type: ignore[arg-type]
        self.answer, self.sent, self.replies = answer, [], {}
        self.blobs: list[bytes] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.sent = list(messages)
        self.blobs = [dict(m.content[PACKED])["records"] for m in self.sent]  # as they left
        for message in self.sent:  # as Flower's grid names a message it pushes
            message.metadata.__dict__["_message_id"] = message.object_id
            reply = self.answer(message)
            self.replies[reply.metadata.reply_to_message_id] = reply
        return list(self.replies)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies[m] for m in message_ids]


def test_the_coordinator_packs_what_it_sends_and_reads_replies_back() -> None:
    model = ArrayRecord(MODEL)

    def node(msg: Message) -> Message:
        return packed_messages(msg, None, lambda m, c: Message(m.content, reply_to=m))  # type: ignore[arg-type]

    grid = EchoGrid(node)
    asks = [_request(RecordDict({"arrays": model, "c": ConfigRecord({"i": i})})) for i in range(3)]
    replies = list(grid.send_and_receive(asks, timeout=60))
    assert len(replies) == 3
    assert len(set(grid.blobs)) == 3  # each node's own content, packed
    for reply in replies:
        assert list(reply.content.array_records["arrays"].keys()) == list(MODEL)


def test_a_node_that_sends_a_broken_blob_is_rejected_not_trusted() -> None:
    def rogue(msg: Message) -> Message:
        content = RecordDict({PACKED: ConfigRecord({"records": b"\xff" * 40})})
        return Message(content=content, reply_to=msg)

    grid = EchoGrid(rogue)
    ask = _request(RecordDict({"arrays": ArrayRecord(MODEL)}))
    (reply,) = grid.send_and_receive([ask], timeout=60)
    checked = receive(reply, ArrayRecord(MODEL))
    assert checked.status == "rejected"
    assert checked.problem.startswith("unreadable reply: packed content: not a Flower RecordDict")


def test_a_secure_round_leaves_out_a_node_whose_packed_reply_is_broken(tmp_path: Path) -> None:
    """In-process, through the real handlers and the app's mod: the coordinator cannot read
    node-1's masked reply, leaves it out with the reason, and the others' round completes."""
    import json

    from clients import client_app
    from fedaiot.config.run import RunConfig
    from fedaiot.rounds.loop import RoundLoop
    from fedaiot.simulation.inprocess import InProcessGrid

    def broken(message: Message, context: Context) -> Message:
        reply = client_app.train_and_mask(message, context)
        blob = pack_content(reply.content)[PACKED]["records"]
        reply.content = RecordDict({PACKED: ConfigRecord({"records": blob[:-3]})})  # cut short
        return reply

    cfg = RunConfig(
        task="breast-cancer", num_rounds=1, epsilon=2.0, min_available_nodes=5,
        secagg_collusion=0.4, output_dir=str(tmp_path / "broken"),
    )  # fmt: skip
    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides={(1, "train.secagg"): broken}))
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    (round_one,) = (e for e in events if e["event"] == "round")
    # an unreadable reply names no one: a simulated node goes by its Flower node id then
    ((name, why),) = round_one["secure_aggregation"]["dropped"].items()
    assert why.startswith("unreadable reply: packed content: not a Flower RecordDict"), why
    statuses = sorted((r["node"], r["status"]) for r in round_one["replies"])
    assert statuses == [(name, "rejected"), *((f"node-{i}", "trained") for i in (0, 2, 3, 4))]
    assert round_one["secure_aggregation"]["error"] == ""


def test_a_node_refuses_a_broken_content_before_any_handler_runs() -> None:
    """A coordinator's unreadable content: the mod raises (Flower answers with an error reply)
    and the handler, which would train and charge the budget, never runs."""
    ran: list[Message] = []
    request = _request(RecordDict({PACKED: ConfigRecord({"records": b"\x0a\xff"})}))
    with pytest.raises(PackingError, match="not a Flower RecordDict"):
        packed_messages(request, None, lambda m, c: ran.append(m) or m)  # type: ignore[arg-type,func-returns-value]
    assert ran == []
