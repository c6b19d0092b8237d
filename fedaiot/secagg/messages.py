"""The messages of a SecAgg+ round, as plain dataclasses with flat records.

Each message turns into a flat record with :meth:`to_record` and back with :meth:`from_record`,
which checks the form of every field and raises :class:`~fedaiot.secagg.errors.SecAggError`
naming it. ``from_record`` checks form only; whether a message belongs to the round (round id,
sender, recipients, lengths tied to the setup) is checked by
:class:`~fedaiot.secagg.client.SecAggClient` and :class:`~fedaiot.secagg.server.SecAggServer`.
Mappings keyed by node id travel as two parallel lists (ids, values).

Flow (server S, node i)::

    S -> all  RoundSetup          0  public parameters
    i -> S    KeyAdvert           1  two fresh X25519 public keys
    S -> i    NeighbourKeys       2  the public keys of i's neighbours
    i -> S    ShareBundle         3  Shamir shares of i's secrets, one AEAD ciphertext each
    S -> i    ForwardedShares     4  the ciphertexts addressed to i
    i -> S    MaskedInput         5  quantised (vector * weight, weight), masked
    S -> i    ConfirmRequest      6a who survived, who dropped (authenticated rounds only)
    i -> S    Confirmation        6b i's signature over those two sets
    S -> i    UnmaskRequest       6  who survived, who dropped (and the confirmations)
    i -> S    UnmaskShares        7  shares of survivors' self-masks, dropped nodes' keys

In an authenticated round (the setup names an institution for each node id) a KeyAdvert
carries its Ed25519 signature, NeighbourKeys relays those signatures, and the survivor sets are
confirmed (6a, 6b) before any share is revealed: see :mod:`fedaiot.secagg.authentication`. An
unauthenticated round's records leave the signature fields out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from fedaiot.secagg.authentication import SIGNATURE_BYTES
from fedaiot.secagg.crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from fedaiot.secagg.records import MAX_ROUND_ID, Record, RecordReader
from fedaiot.secagg.shamir import SHARE_BYTES

# A share ciphertext seals sender (8 B) || recipient (8 B) || share of b || share of mask key.
SHARE_PLAINTEXT_BYTES = 16 + 2 * SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES


def _round(r: RecordReader) -> int:
    return r.int_("round_id", 0, MAX_ROUND_ID)


def _signature(r: RecordReader, name: str = "signature") -> bytes:
    return r.bytes_(name, SIGNATURE_BYTES) if r.has(name) else b""


def _signed(ids: list[int], signatures: Mapping[int, bytes]) -> dict[str, Any]:
    """Parallel id and signature lists, or nothing at all for an unsigned mapping."""
    if not any(signatures.get(i) for i in ids):
        return {}
    return {"signatures": [signatures.get(i, b"") for i in ids]}


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 1, node -> server: the node's two public keys for this round, and in an
    authenticated round its identity key's signature over them and the round context."""

    node_id: int
    round_id: int
    enc_public: bytes
    mask_public: bytes
    signature: bytes = b""

    def to_record(self) -> Record:
        record: Record = {
            "node_id": self.node_id,
            "round_id": self.round_id,
            "enc_public": self.enc_public,
            "mask_public": self.mask_public,
        }
        if self.signature:
            record["signature"] = self.signature
        return record

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        names = ("node_id", "round_id", "enc_public", "mask_public")
        r = RecordReader(d, cls.__name__, names, optional=("signature",))
        return cls(
            r.int_("node_id"),
            _round(r),
            r.bytes_("enc_public", KEY_BYTES),
            r.bytes_("mask_public", KEY_BYTES),
            _signature(r),
        )


@dataclass(frozen=True)
class NeighbourKeys:
    """Stage 2, server -> node: ``{neighbour_id: (enc_public, mask_public)}`` of the node's
    neighbours that advertised keys (and were not excluded for having too few neighbours), with
    each advertisement's signature in an authenticated round."""

    round_id: int
    keys: Mapping[int, tuple[bytes, bytes]]
    signatures: Mapping[int, bytes] = field(default_factory=dict)

    def to_record(self) -> Record:
        ids = sorted(self.keys)
        return {
            "round_id": self.round_id,
            "neighbour_ids": ids,
            "enc_publics": [self.keys[i][0] for i in ids],
            "mask_publics": [self.keys[i][1] for i in ids],
            **_signed(ids, self.signatures),
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        names = ("round_id", "neighbour_ids", "enc_publics", "mask_publics")
        r = RecordReader(d, cls.__name__, names, optional=("signatures",))
        ids = r.ints("neighbour_ids")
        enc = r.bytes_list("enc_publics", KEY_BYTES, len(ids))
        mask = r.bytes_list("mask_publics", KEY_BYTES, len(ids))
        keys = {i: (e, m) for i, e, m in zip(ids, enc, mask, strict=True)}
        signatures = r.bytes_list("signatures", count=len(ids)) if r.has("signatures") else []
        return cls(_round(r), keys, dict(zip(ids, signatures, strict=False)))


@dataclass(frozen=True)
class ShareBundle:
    """Stage 3, node -> server: ``{recipient_id: ciphertext}``, one per neighbour."""

    node_id: int
    round_id: int
    ciphertexts: Mapping[int, bytes]

    def to_record(self) -> Record:
        ids = sorted(self.ciphertexts)
        return {
            "node_id": self.node_id,
            "round_id": self.round_id,
            "recipients": ids,
            "ciphertexts": [self.ciphertexts[i] for i in ids],
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        r = RecordReader(d, cls.__name__, ("node_id", "round_id", "recipients", "ciphertexts"))
        cts = r.mapping("recipients", "ciphertexts", SHARE_CIPHERTEXT_BYTES)
        return cls(r.int_("node_id"), _round(r), cts)


@dataclass(frozen=True)
class ForwardedShares:
    """Stage 4, server -> node: ``{sender_id: ciphertext}`` addressed to the node, from those
    of its neighbours whose share bundle arrived."""

    round_id: int
    ciphertexts: Mapping[int, bytes]

    def to_record(self) -> Record:
        ids = sorted(self.ciphertexts)
        return {
            "round_id": self.round_id,
            "senders": ids,
            "ciphertexts": [self.ciphertexts[i] for i in ids],
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        r = RecordReader(d, cls.__name__, ("round_id", "senders", "ciphertexts"))
        return cls(_round(r), r.mapping("senders", "ciphertexts", SHARE_CIPHERTEXT_BYTES))


@dataclass(frozen=True)
class MaskedInput:
    """Stage 5, node -> server: ``encode(concat(vector * weight, [weight]))`` plus masks, a
    ``uint64`` vector of length ``vector_length + 1`` that looks uniformly random on its own."""

    node_id: int
    round_id: int
    vector: npt.NDArray[np.uint64]

    def to_record(self) -> Record:
        return {"node_id": self.node_id, "round_id": self.round_id, "vector": self.vector}

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        r = RecordReader(d, cls.__name__, ("node_id", "round_id", "vector"))
        return cls(r.int_("node_id"), _round(r), r.array("vector"))


@dataclass(frozen=True)
class ConfirmRequest:
    """Stage 6a of an authenticated round, server -> surviving node: the survivor and dropped
    sets, for the node to sign before it reveals anything."""

    round_id: int
    survivors: list[int]
    dropped: list[int]

    def to_record(self) -> Record:
        return {
            "round_id": self.round_id,
            "survivors": sorted(self.survivors),
            "dropped": sorted(self.dropped),
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        r = RecordReader(d, cls.__name__, ("round_id", "survivors", "dropped"))
        return cls(_round(r), r.ints("survivors"), r.ints("dropped"))


@dataclass(frozen=True)
class Confirmation:
    """Stage 6b, node -> server: the node's signature over the sets it was shown."""

    node_id: int
    round_id: int
    signature: bytes

    def to_record(self) -> Record:
        return {"node_id": self.node_id, "round_id": self.round_id, "signature": self.signature}

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        r = RecordReader(d, cls.__name__, ("node_id", "round_id", "signature"))
        return cls(r.int_("node_id"), _round(r), r.bytes_("signature", SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 6, server -> surviving node: the nodes whose masked input arrived (``survivors``)
    and those that shared keys but sent no masked input (``dropped``); in an authenticated
    round, every confirmation of those sets the server received (``{node_id: signature}``)."""

    round_id: int
    survivors: list[int]
    dropped: list[int]
    confirmations: Mapping[int, bytes] = field(default_factory=dict)

    def to_record(self) -> Record:
        record: Record = {
            "round_id": self.round_id,
            "survivors": sorted(self.survivors),
            "dropped": sorted(self.dropped),
        }
        if self.confirmations:
            ids = sorted(self.confirmations)
            record["confirmed_by"] = ids
            record["confirmations"] = [self.confirmations[i] for i in ids]
        return record

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        optional = ("confirmed_by", "confirmations")
        r = RecordReader(d, cls.__name__, ("round_id", "survivors", "dropped"), optional)
        confirmations = (
            r.mapping("confirmed_by", "confirmations", SIGNATURE_BYTES)
            if r.has("confirmed_by")
            else {}
        )
        return cls(_round(r), r.ints("survivors"), r.ints("dropped"), confirmations)


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 7, node -> server: ``{owner_id: share}`` of the self-mask seeds of survivors and
    of the mask private keys of dropped nodes (never both for one owner)."""

    node_id: int
    round_id: int
    self_mask_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]

    def to_record(self) -> Record:
        b_ids, sk_ids = sorted(self.self_mask_shares), sorted(self.key_shares)
        return {
            "node_id": self.node_id,
            "round_id": self.round_id,
            "self_mask_owners": b_ids,
            "self_mask_shares": [self.self_mask_shares[i] for i in b_ids],
            "key_owners": sk_ids,
            "key_shares": [self.key_shares[i] for i in sk_ids],
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self:
        names = ("node_id", "round_id", "self_mask_owners", "self_mask_shares")
        r = RecordReader(d, cls.__name__, (*names, "key_owners", "key_shares"))
        return cls(
            r.int_("node_id"),
            _round(r),
            r.mapping("self_mask_owners", "self_mask_shares", SHARE_BYTES),
            r.mapping("key_owners", "key_shares", SHARE_BYTES),
        )
