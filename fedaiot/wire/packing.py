"""Every ArrayRecord of a message as one safetensors blob on the wire: fewer objects, fewer
requests.

Flower 1.41 sends a message as a tree of objects (the message, its RecordDict, each record,
each Array, each Array's chunks) and moves each object in a request of its own, which the
SuperLink checks, authenticates and stores one at a time. An ArrayRecord of four tensors is
nine objects (the record, each tensor and its chunk); packed, three. On the 2-core machine most
of a deployed round's SuperLink CPU went to these requests (docs/deployment.md). The content is
the same: the tensors' names, dtypes, shapes and values, nothing added (docs/privacy.md).

A packed record holds one uint8 Array named :data:`PACKED`; its bytes are a safetensors file
whose metadata keeps the tensors' order (safetensors itself sorts them). Nothing is unpickled:
safetensors reads raw little-endian buffers against a JSON header it checks. The coordinator
packs what it sends unless it runs Flower's stock behaviour (``fedaiot.rounds.exchanges``; the
simulations and the in-process grid pack too); a node answers packed exactly when it was asked
packed, so either side may run Flower's stock behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedaiot.errors import BadInputError

PACKED = "fedaiot.packed/1"  # the one Array of a packed record (not a torch state-dict key)
_ORDER = "order"


class PackingError(BadInputError):
    """A packed record that cannot be read back; the message says why."""


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED]


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one Array (itself if already packed or empty)."""
    if not record or is_packed(record):
        return record
    tensors = {name: np.require(array.numpy(), requirements="C") for name, array in record.items()}
    blob = save(tensors, metadata={_ORDER: json.dumps(list(tensors))})
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The tensors of a packed record, in their order (``record`` itself if not packed)."""
    if not is_packed(record):
        return record
    blob = record[PACKED].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise PackingError(f"packed record: expected 1-D uint8, got {blob.dtype} {blob.shape}")
    data = blob.tobytes()
    try:
        tensors = load(data)
        order = json.loads(_metadata(data).get(_ORDER, "null"))
    except (SafetensorError, ValueError) as exc:
        raise PackingError(f"packed record: not a safetensors file ({exc})") from None
    if not isinstance(order, list) or sorted(order) != sorted(tensors):
        raise PackingError("packed record: its tensor order does not name its tensors")
    return ArrayRecord({name: Array(tensors[name]) for name in order})


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (the format: an 8-byte little-endian length,
    then that many bytes of JSON; ``load`` has already checked both)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def pack_content(
    content: RecordDict, done: dict[int, tuple[ArrayRecord, ArrayRecord]] | None = None
) -> RecordDict:
    """A RecordDict whose ArrayRecords are packed; its other records are the same objects.
    ``done`` remembers records already packed (the global model sent to every node is packed
    once an exchange)."""
    done = {} if done is None else done
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if id(record) not in done:  # the record is kept beside its id: the id stays its own
                done[id(record)] = (record, pack_record(record))
            record = done[id(record)][1]
        out[name] = record
    return out


def unpack_content(content: RecordDict, *, strict: bool = True) -> RecordDict:
    """A RecordDict whose packed ArrayRecords are unpacked. Not ``strict``: a record that
    cannot be read stays as it came (packed), for the reply's checks to reject."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            try:
                record = unpack_record(record)
            except PackingError:
                if strict:
                    raise
        out[name] = record
    return out


def packed(message: Message) -> bool:
    """Whether any ArrayRecord of ``message`` is packed."""
    return message.has_content() and any(
        is_packed(r) for r in message.content.array_records.values()
    )


def packed_arrays(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A ClientApp mod: the handlers see a message's tensors as Flower records, and the reply
    goes back packed when the request came packed. A packed record that cannot be read is the
    coordinator's error, answered as an error reply by Flower."""
    if not packed(msg):
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
