"""Stage 0 of a round: the public parameters every party agrees on.

The server draws a :class:`RoundSetup` per round and sends it to every node (``to_record`` /
``from_record``). Every key, graph and ciphertext of the round is bound to it through
:attr:`RoundSetup.context`, so parties holding different setups simply fail to authenticate one
another rather than mixing rounds.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Self

from fedaiot.secagg.authentication import NAME
from fedaiot.secagg.errors import SecAggError
from fedaiot.secagg.graph import Graph, check_degree, default_degree, default_threshold
from fedaiot.secagg.graph import neighbours as build_graph
from fedaiot.secagg.quantize import Quantizer
from fedaiot.secagg.records import MAX_NODE_ID, MAX_ROUND_ID, Record, RecordReader

ROUND_NONCE_BYTES = 32
_CONTEXT_LABEL = b"fedaiot-secagg+/1"


@dataclass(frozen=True)
class RoundSetup:
    """Stage 0, server -> every node: the public parameters of one round.

    ``round_id`` must never repeat, across runs too (a message bearing another id is a replay
    and is refused; a Flower round number alone repeats in the next run, so use
    :meth:`create`'s random id or mix in the run id) and ``round_nonce`` must be 32 fresh random
    bytes; both enter the round context that salts every derived key and is bound into every
    ciphertext, and the nonce seeds the round's graph. ``max_abs`` bounds every coordinate a node
    encodes: each of ``vector * weight`` and the ``weight`` itself.

    Raises :class:`SecAggError` unless ``3 <= n``, ``degree`` is ``n - 1`` or even in
    ``[2, n - 2]``, ``(degree + 1) / 2 < threshold <= degree + 1`` (more than half of a node's
    share holders: its ``degree`` neighbours and itself), and ``n`` sums of ``max_abs`` fit.
    """

    round_id: int
    round_nonce: bytes
    node_ids: Sequence[int]
    threshold: int
    degree: int
    vector_length: int
    frac_bits: int = 24
    modulus_bits: int = 64
    max_abs: float = 1e6
    # the institution each node id stands for, in node id order; empty: an unauthenticated round
    identities: Sequence[str] = ()
    FIELDS: ClassVar[tuple[str, ...]] = (
        "round_id",
        "round_nonce",
        "node_ids",
        "threshold",
        "degree",
        "vector_length",
        "frac_bits",
        "modulus_bits",
        "max_abs",
    )

    def __post_init__(self) -> None:
        ids = self.node_ids
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise SecAggError("RoundSetup.node_ids: every id must be an int")
        if any(not 0 <= i <= MAX_NODE_ID for i in ids) or len(set(ids)) != len(ids):
            raise SecAggError("RoundSetup.node_ids: ids must be distinct and in [0, 2^64)")
        object.__setattr__(self, "node_ids", tuple(sorted(ids)))
        n = len(ids)
        if n < 3:
            raise SecAggError(
                f"RoundSetup.node_ids: secure aggregation needs at least 3 nodes, got {n} (with "
                "2, each node can subtract its own input from the sum)"
            )
        if not 0 <= self.round_id <= MAX_ROUND_ID:
            raise SecAggError(f"RoundSetup.round_id: {self.round_id} is outside [0, 2^63)")
        if not isinstance(self.round_nonce, bytes) or len(self.round_nonce) != ROUND_NONCE_BYTES:
            raise SecAggError(f"RoundSetup.round_nonce: must be {ROUND_NONCE_BYTES} bytes")
        check_degree(n, self.degree)
        if not (self.degree + 1) / 2 < self.threshold <= self.degree + 1:
            raise SecAggError(
                f"RoundSetup.threshold: {self.threshold} must exceed half of the "
                f"{self.degree + 1} share holders (degree + self) and be at most "
                f"{self.degree + 1}; use {default_threshold(self.degree)} or more"
            )
        if self.vector_length < 1:
            raise SecAggError(f"RoundSetup.vector_length: must be >= 1, got {self.vector_length}")
        if not math.isfinite(self.max_abs) or self.max_abs <= 0:
            raise SecAggError(f"RoundSetup.max_abs: must be finite and > 0, got {self.max_abs}")
        self.quantizer.check_capacity(self.max_abs, n)
        self._check_identities(ids)

    def _check_identities(self, ids: Sequence[int]) -> None:
        names = list(self.identities)
        if not names:
            object.__setattr__(self, "identities", ())
            return
        if len(names) != len(ids) or len(set(names)) != len(names):
            raise SecAggError(
                "RoundSetup.identities: one distinct institution per node id is needed (an "
                "institution standing for two nodes would count twice among the honest)"
            )
        if not all(isinstance(x, str) and NAME.fullmatch(x) for x in names):
            raise SecAggError("RoundSetup.identities: every entry must be an institution name")
        # identities travel in node id order: sort them with the ids they belong to
        order = sorted(range(len(ids)), key=lambda k: ids[k])
        object.__setattr__(self, "identities", tuple(names[k] for k in order))

    def identity_of(self, node_id: int) -> str:
        """The institution the setup names for ``node_id`` ("" in an unauthenticated round)."""
        if not self.identities:
            return ""
        return self.identities[self.share_id(node_id) - 1]

    @classmethod
    def create(
        cls,
        node_ids: Sequence[int],
        *,
        vector_length: int,
        threshold: int | None = None,
        degree: int | None = None,
        frac_bits: int = 24,
        modulus_bits: int = 64,
        max_abs: float = 1e6,
        round_id: int | None = None,
        identities: Sequence[str] = (),
    ) -> RoundSetup:
        """A setup with a fresh random nonce (and round id unless given) and default k and t."""
        k = default_degree(len(node_ids)) if degree is None else degree
        return cls(
            round_id=secrets.randbelow(MAX_ROUND_ID + 1) if round_id is None else round_id,
            round_nonce=secrets.token_bytes(ROUND_NONCE_BYTES),
            node_ids=list(node_ids),
            threshold=default_threshold(k) if threshold is None else threshold,
            degree=k,
            vector_length=vector_length,
            frac_bits=frac_bits,
            modulus_bits=modulus_bits,
            max_abs=max_abs,
            identities=identities,
        )

    @cached_property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.frac_bits, self.modulus_bits, self.max_abs)

    @cached_property
    def context(self) -> bytes:
        """SHA-256 of every setup field: the salt of all keys and part of all AEAD data."""
        h = hashlib.sha256(_CONTEXT_LABEL)
        h.update(struct.pack(">QQ", self.round_id, len(self.node_ids)))
        h.update(self.round_nonce)
        h.update(b"".join(i.to_bytes(8, "big") for i in self.node_ids))
        h.update(
            struct.pack(
                ">QQQQQd",
                self.threshold,
                self.degree,
                self.vector_length,
                self.frac_bits,
                self.modulus_bits,
                self.max_abs,
            )
        )
        for name in self.identities:  # who is who is part of what every signature covers
            h.update(len(name).to_bytes(1, "big") + name.encode())
        return h.digest()

    @cached_property
    def graph(self) -> Graph:
        return build_graph(self.node_ids, self.degree, self.round_nonce)

    @cached_property
    def _index(self) -> dict[int, int]:
        return {node: i + 1 for i, node in enumerate(self.node_ids)}

    def share_id(self, node_id: int) -> int:
        """The Shamir x-coordinate of the shares a node holds: its rank among node ids, 1..n."""
        try:
            return self._index[node_id]
        except KeyError:
            raise SecAggError(f"node {node_id} is not in this round") from None

    @property
    def masked_length(self) -> int:
        """Length of a masked vector: ``vector_length`` plus one slot for the weight."""
        return self.vector_length + 1

    def to_record(self) -> Record:
        rec: Record = {name: getattr(self, name) for name in self.FIELDS}
        rec["node_ids"] = list(self.node_ids)
        rec["max_abs"] = struct.pack(">d", self.max_abs)
        if self.identities:
            rec["identities"] = list(self.identities)
        return rec

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        r = RecordReader(d, "RoundSetup", cls.FIELDS, optional=("identities",))
        return cls(
            round_id=r.int_("round_id", 0, MAX_ROUND_ID),
            round_nonce=r.bytes_("round_nonce", ROUND_NONCE_BYTES),
            node_ids=r.ints("node_ids"),
            threshold=r.int_("threshold"),
            degree=r.int_("degree"),
            vector_length=r.int_("vector_length", 1),
            frac_bits=r.int_("frac_bits", 0, 62),
            modulus_bits=r.int_("modulus_bits", 2, 64),
            max_abs=struct.unpack(">d", r.bytes_("max_abs", 8))[0],
            identities=r.strs("identities") if r.has("identities") else (),
        )
