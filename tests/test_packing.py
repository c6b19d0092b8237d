"""Tensors travel as one safetensors blob a record: the same content, read back exactly, and a
blob that cannot be read is refused, never trusted (fedaiot.wire.packing)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedaiot.config.polling import Polling
from fedaiot.rounds.exchanges import ReplyLoop
from fedaiot.wire.packing import (
    PACKED,
    PackingError,
    pack_content,
    pack_record,
    packed,
    packed_arrays,
    unpack_content,
    unpack_record,
)
from fedaiot.wire.records import receive, reply_content
from fedaiot.wire.replies import NodeReply

pytestmark = pytest.mark.usefixtures("flower_identity")

MODEL = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4), "a.first": torch.randn(2)}


def test_a_record_comes_back_exactly_in_its_own_order() -> None:
    arrays = {
        "z": np.arange(6, dtype=np.float32).reshape(2, 3),
        "masked": np.array([2**63 + 5, 7], dtype=np.uint64),  # SecAgg's Z_2^64 values
        "a": np.array([-1, 3], dtype=np.int64),
        "scalar": np.array(1.5, dtype=np.float64),
    }
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    wire = pack_record(record)
    assert list(wire.keys()) == [PACKED] and wire[PACKED].numpy().dtype == np.uint8
    back = unpack_record(wire)
    assert list(back.keys()) == list(arrays)  # safetensors sorts; the order is kept
    for name, value in arrays.items():
        got = back[name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        assert np.array_equal(got, value)
    assert unpack_record(record) is record  # a record that was not packed is left as it is


def test_a_packed_model_is_fewer_objects_on_the_wire() -> None:
    content = RecordDict({"arrays": ArrayRecord(MODEL), "config": ConfigRecord({"r": 1})})
    before, after = get_all_nested_objects(content), get_all_nested_objects(pack_content(content))
    assert len(before) == 9 and len(after) == 5  # 3 tensors: 7 objects for the record, then 3
    back = unpack_content(pack_content(content))
    assert back["config"] is content["config"]  # other records travel as they were
    state = back.array_records["arrays"].to_torch_state_dict()
    assert list(state) == list(MODEL) and all(torch.equal(state[k], v) for k, v in MODEL.items())


@pytest.mark.parametrize(
    "blob, why",
    [
        (np.frombuffer(b"not a safetensors file at all", dtype=np.uint8), "not a safetensors"),
        (np.zeros(3, dtype=np.float32), "expected 1-D uint8"),
    ],
)
def test_an_unreadable_blob_is_refused_with_the_reason(blob: np.ndarray, why: str) -> None:
    with pytest.raises(PackingError, match=why):
        unpack_record(ArrayRecord({PACKED: Array(blob)}))


def test_a_blob_whose_order_does_not_name_its_tensors_is_refused() -> None:
    from safetensors.numpy import save

    data = save({"w": np.zeros(2, np.float32)}, metadata={"order": '["w", "extra"]'})
    with pytest.raises(PackingError, match="order"):
        unpack_record(ArrayRecord({PACKED: Array(np.frombuffer(data, dtype=np.uint8))}))


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
    reply = packed_arrays(_request(pack_content(content)), context, handler)
    assert list(seen[0].array_records["arrays"].keys()) == list(MODEL)  # the handler's view
    assert packed(reply)
    reply = packed_arrays(_request(content), context, handler)  # a stock coordinator
    assert not packed(reply) and list(reply.content.array_records["arrays"]) == list(MODEL)


class EchoGrid(ReplyLoop):
    """Each message is answered at once, by ``answer``, as a node's reply."""

    def __init__(self, answer: Any) -> None:
        super().__init__(self, Polling(results=0.001))  # type: ignore[arg-type]
        self.answer, self.sent, self.replies = answer, [], {}
        self.blobs: list[ArrayRecord | None] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.sent = list(messages)
        self.blobs = [m.content.array_records.get("arrays") for m in self.sent]  # as they left
        for message in self.sent:  # as Flower's grid names a message it pushes
            message.metadata.__dict__["_message_id"] = message.object_id
            reply = self.answer(message)
            self.replies[reply.metadata.reply_to_message_id] = reply
        return list(self.replies)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies[m] for m in message_ids]


def test_the_coordinator_packs_the_model_once_and_reads_replies_back() -> None:
    model = ArrayRecord(MODEL)

    def node(msg: Message) -> Message:
        return packed_arrays(msg, None, lambda m, c: Message(m.content, reply_to=m))  # type: ignore[arg-type]

    grid = EchoGrid(node)
    asks = [_request(RecordDict({"arrays": model, "c": ConfigRecord({"i": i})})) for i in range(3)]
    replies = list(grid.send_and_receive(asks, timeout=60))
    assert len(replies) == 3
    assert len({id(record) for record in grid.blobs}) == 1  # one blob for every node
    assert grid.blobs[0] is not None and list(grid.blobs[0]) == [PACKED]
    for reply in replies:
        assert list(reply.content.array_records["arrays"].keys()) == list(MODEL)


def test_a_node_that_sends_a_broken_blob_is_rejected_not_trusted() -> None:
    def rogue(msg: Message) -> Message:
        reply = NodeReply("trained", "node-1", 5.0, {"num-examples": 5.0}, dict(MODEL))
        content = reply_content(reply, private=False)
        content["arrays"] = ArrayRecord({PACKED: Array(np.frombuffer(b"\xff" * 40, np.uint8))})
        return Message(content=content, reply_to=msg)

    grid = EchoGrid(rogue)
    ask = _request(RecordDict({"arrays": ArrayRecord(MODEL)}))
    (reply,) = grid.send_and_receive([ask], timeout=60)
    checked = receive(reply, ArrayRecord(MODEL))
    assert checked.status == "rejected" and PACKED in checked.problem


def test_a_secure_round_leaves_out_a_node_whose_masked_blob_is_broken(tmp_path: Path) -> None:
    """In-process, through the real handlers and the app's mod: the coordinator cannot read
    node-1's masked input, drops it with the reason, and the others' round completes."""
    import json

    from clients import client_app
    from fedaiot.config.run import RunConfig
    from fedaiot.rounds.loop import RoundLoop
    from fedaiot.secure_rounds.wire import SECAGG_ARRAYS
    from fedaiot.simulation.inprocess import InProcessGrid

    def broken(message: Message, context: Context) -> Message:
        reply = client_app.train_and_mask(message, context)
        garbage = Array(np.frombuffer(b"\x10" + b"\x00" * 7 + b"{not json", dtype=np.uint8))
        reply.content[SECAGG_ARRAYS] = ArrayRecord({PACKED: garbage})
        return reply

    cfg = RunConfig(
        task="breast-cancer", num_rounds=1, epsilon=2.0, min_available_nodes=5,
        secagg_collusion=0.4, output_dir=str(tmp_path / "broken"),
    )  # fmt: skip
    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides={(1, "train.secagg"): broken}))
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    (round_one,) = (e for e in events if e["event"] == "round")
    assert PACKED in round_one["secure_aggregation"]["dropped"]["node-1"]
    statuses = {r["node"]: r["status"] for r in round_one["replies"]}
    assert statuses["node-1"] == "dropped" and statuses["node-0"] == "trained"
    assert round_one["secure_aggregation"]["error"] == ""


def test_a_node_refuses_a_broken_blob_before_any_handler_runs() -> None:
    """A coordinator's unreadable blob: the mod raises (Flower answers with an error reply)
    and the handler, which would train and charge the budget, never runs."""
    ran: list[Message] = []
    garbage = ArrayRecord({PACKED: Array(np.frombuffer(b"\x00" * 12, dtype=np.uint8))})
    request = _request(RecordDict({"arrays": garbage}))
    with pytest.raises(PackingError, match="not a safetensors"):
        packed_arrays(request, None, lambda m, c: ran.append(m) or m)  # type: ignore[arg-type,func-returns-value]
    assert ran == []
