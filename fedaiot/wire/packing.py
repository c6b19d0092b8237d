"""A message's whole content as one record on the wire: fewer objects, fewer requests.

Flower 1.41 sends a message as a tree of objects (the message, its RecordDict, each record,
each Array, each Array's chunks) and moves each object in a request of its own, which the
SuperLink checks, authenticates and stores one at a time. A secure round's request to train
was eight objects and its reply nine; packed, each is three (the message, its RecordDict and
one ConfigRecord). On the 2-core machine most of a deployed round's SuperLink CPU went to
these requests (docs/deployment.md). The content is the same records, nothing added
(docs/privacy.md).

A packed content holds one ConfigRecord named :data:`PACKED` whose ``records`` bytes are
Flower's own protobuf encoding of the RecordDict (``flwr.common.serde``, what Flower puts on
the wire for a record anyway). Nothing is unpickled: protobuf parses the bytes against its
schema and each Array is read by Flower with ``allow_pickle=False``. The coordinator packs
what it sends unless it runs Flower's stock behaviour (``fedaiot.rounds.exchanges``; the
simulations and the in-process grid pack too); a node answers packed exactly when it was asked
packed, so either side may run Flower's stock behaviour. A content larger than
:data:`MAX_PACKED_BYTES` travels as Flower's records, chunked by Flower.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import (
    array_record_to_proto,
    config_record_to_proto,
    metric_record_to_proto,
    recorddict_from_proto,
)
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

from fedaiot.errors import BadInputError

PACKED = "fedaiot.packed/2"  # the one record of a packed content
_RECORDS = "records"
MAX_PACKED_BYTES = 64 * 2**20  # one request each way: larger contents go in Flower's chunks
Item = ProtoRecordDict.Item


class PackingError(BadInputError):
    """A packed content that cannot be read back; the message says why."""


def is_packed(content: RecordDict) -> bool:
    return list(content.keys()) == [PACKED]


def pack_content(
    content: RecordDict, done: dict[int, tuple[ArrayRecord, ProtoArrayRecord]] | None = None
) -> RecordDict:
    """``content`` as one record (itself if empty, already packed, or too large). ``done``
    remembers the ArrayRecords already encoded (the global model sent to every node is
    encoded once an exchange)."""
    if not content or is_packed(content):
        return content
    done = {} if done is None else done
    items = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if id(record) not in done:  # the record is kept beside its id: the id stays its own
                done[id(record)] = (record, array_record_to_proto(record))
            items.append(Item(key=name, array_record=done[id(record)][1]))
        elif isinstance(record, MetricRecord):
            items.append(Item(key=name, metric_record=metric_record_to_proto(record)))
        else:
            items.append(Item(key=name, config_record=config_record_to_proto(record)))
    blob = ProtoRecordDict(items=items).SerializeToString()
    if len(blob) > MAX_PACKED_BYTES:
        return content
    return RecordDict({PACKED: ConfigRecord({_RECORDS: blob})})


def unpack_content(content: RecordDict) -> RecordDict:
    """The records of a packed content (``content`` itself if not packed); raises
    :class:`PackingError` saying why one cannot be read."""
    if not is_packed(content):
        return content
    record = content[PACKED]
    blob = record.get(_RECORDS) if isinstance(record, ConfigRecord) else None
    if not isinstance(blob, bytes) or set(record) != {_RECORDS}:
        raise PackingError(f"packed content: {PACKED} must be a ConfigRecord of '{_RECORDS}' bytes")
    try:
        unpacked = recorddict_from_proto(ProtoRecordDict.FromString(blob))
    except (DecodeError, ValueError, TypeError) as exc:
        raise PackingError(f"packed content: not a Flower RecordDict ({exc})") from None
    if PACKED in unpacked:
        raise PackingError("packed content: packed twice")
    return unpacked


def unreadable(content: RecordDict) -> str:
    """Why the coordinator could not read a reply's packed content ("" if it could): such a
    reply keeps only the reason, for the reply's checks to reject it with."""
    if not is_packed(content) or _RECORDS in content[PACKED]:
        return ""
    return str(content[PACKED].get("unreadable", "packed content"))


def read_packed_reply(content: RecordDict) -> RecordDict:
    """A reply's records; a packed content that cannot be read is replaced by the reason
    (:func:`unreadable` gives it back), never passed on as records."""
    try:
        return unpack_content(content)
    except PackingError as exc:
        return RecordDict({PACKED: ConfigRecord({"unreadable": str(exc)})})


def packed(message: Message) -> bool:
    """Whether ``message`` carries packed content."""
    return message.has_content() and is_packed(message.content)


def packed_messages(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A ClientApp mod: the handlers see a message's records, and the reply goes back packed
    when the request came packed. A packed content that cannot be read is the coordinator's
    error, answered as an error reply by Flower before any handler runs."""
    if not packed(msg):
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
