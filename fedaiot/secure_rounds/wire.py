"""How secure-aggregation messages and model updates travel in Flower records.

Shared by the coordinator's stages (``fedaiot.secure_rounds.driver``) and the node's
handlers (``fedaiot.secure_rounds.handlers``). A SecAgg message's record becomes a ConfigRecord
for its scalars, bytes and lists, plus an ArrayRecord for its numpy arrays (Flower stores those
without pickle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

# Message types of the stages. A round is: keys advertised (by the previous round's unmask
# reply when the node set is the same, else by an exchange of its own), keys shared, the input
# computed and masked in one exchange (training, or a release's vector), in authenticated
# rounds the survivor sets confirmed, and the unmasking.
ADVERTISE = "query.secagg_advertise"
SHARE_KEYS = "query.secagg_share"
TRAIN_AND_MASK = "train.secagg"
VECTOR_AND_MASK = "query.secagg_vector"  # a vector (statistics, evaluation) instead
CONFIRM = "query.secagg_confirm"  # authenticated rounds: sign the survivor sets first
UNMASK = "query.secagg_unmask"

SECAGG = "secagg"  # the record names inside a message's RecordDict
SECAGG_ARRAYS = "secagg-arrays"
# The next round's setup in an unmask request, and the node's key advert for it in the reply.
NEXT = "secagg-next"


def pack(record: dict[str, Any], **extra: Any) -> RecordDict:
    """A SecAgg record (and optional extra records) as a Flower RecordDict."""
    arrays = {k: v for k, v in record.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in record.items() if k not in arrays}
    content = RecordDict({SECAGG: ConfigRecord(scalars), **extra})
    if arrays:
        content[SECAGG_ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return content


def unpack(content: RecordDict) -> dict[str, Any]:
    """The SecAgg record a RecordDict carries (KeyError if it carries none)."""
    record: dict[str, Any] = dict(content.config_records[SECAGG])
    if SECAGG_ARRAYS in content.array_records:
        for name, array in content.array_records[SECAGG_ARRAYS].items():
            record[name] = array.numpy()
    return record


def flatten(arrays: ArrayRecord, order: ArrayRecord | None = None) -> npt.NDArray[np.float64]:
    """All tensors of a model as one float64 vector, in ``order``'s key order (default: the
    record's own). Node and coordinator must flatten in the same order: pass the global model."""
    keys = list((order or arrays).keys())
    return np.concatenate([arrays[k].numpy().astype(np.float64).ravel() for k in keys])


def unflatten(vector: npt.NDArray[np.float64], like: ArrayRecord) -> ArrayRecord:
    """The inverse of :func:`flatten`, with ``like``'s shapes and dtypes."""
    out: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for name, array in like.items():
        reference = array.numpy()
        size = reference.size
        out[name] = vector[offset : offset + size].reshape(reference.shape).astype(reference.dtype)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector of {vector.size} values for a model of {offset} parameters")
    return ArrayRecord({k: Array(v) for k, v in out.items()})


def survivor_floor(nodes: int, dropout: float, threshold: int) -> int:
    """The fewest survivors a distributed-DP round may unmask: all of its ``nodes`` but the
    fraction ``dropout`` the run tolerates, and never fewer than the protocol's threshold.
    Each node sizes its noise share for a sum of this many (less the colluding ones), and
    refuses to unmask a smaller one."""
    return max(threshold, nodes - int(dropout * nodes))
