"""Flat records for the protocol's messages, and the typed reader that checks them.

A record maps field names to ``int``, ``bytes``, ``list[int]``, ``list[bytes]``, ``list[str]``
or ``numpy`` arrays, the types a Flower ``ConfigRecord`` / ``ArrayRecord`` carries. Reading one
back checks every field's presence, type and length and raises
:class:`~fedaiot.secagg.errors.SecAggError` naming the message and the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedaiot.secagg.errors import SecAggError

RecordValue = int | bytes | list[int] | list[bytes] | list[str] | npt.NDArray[Any]
Record = dict[str, RecordValue]
MAX_NODE_ID = 2**64 - 1
MAX_ROUND_ID = 2**63 - 1


def record_size(record: Record) -> int:
    """Payload bytes of a record: 8 per int, the length of bytes, the size of arrays."""
    total = 0
    for value in record.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(v) if isinstance(v, bytes) else 8 for v in value)
        else:
            total += 8
    return total


class RecordReader:
    """Typed, length-checked access to a record's fields; errors name message and field."""

    def __init__(
        self,
        record: Mapping[str, Any],
        message: str,
        fields: Sequence[str],
        optional: Sequence[str] = (),
    ) -> None:
        """``optional`` fields may be absent: an unauthenticated round leaves its signature
        fields out, so its messages are exactly what they were before signatures existed."""
        if not isinstance(record, Mapping):
            raise SecAggError(f"{message}: a record must be a mapping, got {type(record)}")
        missing = [f for f in fields if f not in record]
        extra = sorted(set(record) - set(fields) - set(optional))
        if missing or extra:
            raise SecAggError(f"{message}: missing fields {missing}, unknown fields {extra}")
        self.d, self.message = record, message

    def fail(self, name: str, why: str) -> SecAggError:
        return SecAggError(f"{self.message}.{name}: {why}")

    def int_(self, name: str, lo: int = 0, hi: int = MAX_NODE_ID) -> int:
        v = self.d[name]
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise self.fail(name, f"expected int, got {type(v).__name__}")
        if not lo <= int(v) <= hi:
            raise self.fail(name, f"{int(v)} is outside [{lo}, {hi}]")
        return int(v)

    def has(self, name: str) -> bool:
        return name in self.d

    def bytes_(self, name: str, length: int | None = None) -> bytes:
        v = self.d[name]
        if not isinstance(v, bytes):
            raise self.fail(name, f"expected bytes, got {type(v).__name__}")
        if length is not None and len(v) != length:
            raise self.fail(name, f"expected {length} bytes, got {len(v)}")
        return v

    def ints(self, name: str, lo: int = 0, hi: int = MAX_NODE_ID) -> list[int]:
        v = self.d[name]
        if not isinstance(v, list | tuple):
            raise self.fail(name, f"expected list[int], got {type(v).__name__}")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int | np.integer) or not lo <= x <= hi:
                raise self.fail(name, f"element {x!r} is not an int in [{lo}, {hi}]")
        if len(set(v)) != len(v):
            raise self.fail(name, "ids must be distinct")
        return [int(x) for x in v]

    def strs(self, name: str, pattern: str = r"[a-z0-9][a-z0-9_-]{0,62}") -> list[str]:
        v = self.d[name]
        if not isinstance(v, list | tuple) or not all(
            isinstance(x, str) and re.fullmatch(pattern, x) for x in v
        ):
            raise self.fail(name, f"expected a list of names matching {pattern}")
        return list(v)

    def bytes_list(self, name: str, length: int | None = None, count: int = -1) -> list[bytes]:
        v = self.d[name]
        if not isinstance(v, list | tuple) or not all(isinstance(x, bytes) for x in v):
            raise self.fail(name, "expected list[bytes]")
        if count >= 0 and len(v) != count:
            raise self.fail(name, f"expected {count} elements (one per id), got {len(v)}")
        if length is not None and any(len(x) != length for x in v):
            raise self.fail(name, f"every element must be {length} bytes")
        return list(v)

    def mapping(self, ids: str, values: str, length: int) -> dict[int, bytes]:
        keys = self.ints(ids)
        return dict(zip(keys, self.bytes_list(values, length, len(keys)), strict=True))

    def array(self, name: str) -> npt.NDArray[np.uint64]:
        v = self.d[name]
        if not isinstance(v, np.ndarray) or v.dtype != np.uint64 or v.ndim != 1:
            raise self.fail(name, "expected a 1-D numpy array of dtype uint64")
        return v
