"""A node's side of one SecAgg+ round.

The guarantee. Against an honest-but-curious server (it follows the protocol but keeps and
studies every message it sees), and as long as the node's neighbours do not collude with it,
what the server learns from this node is only its contribution to the total of the surviving
nodes: the masked vector is indistinguishable from uniform without the self-mask seed ``b`` and
the pairwise seeds, and the server only ever gets ``b`` (if the node survived) or its mask key
(if it dropped), never both: each holder hands out one of its two shares of an owner, at least
``threshold`` shares are needed, and the threshold exceeds half of the ``degree + 1`` holders.
The node refuses to unmask (``unmask`` raises) when the request names a node both as survivor
and dropped, names this node as dropped, lists fewer than ``threshold`` survivors, or lists
survivors that are not connected in the round's graph; in each case unmasking could reveal
less than a sum over all survivors.

Against a *malicious* server, give the client the node's :class:`NodeIdentity` (its identity
key and pinned roster): the round must then name an institution for every node id; the client
signs its advertisement, refuses the round if any neighbour's relayed keys are not signed by
that neighbour's roster key, signs the survivor sets it is shown (:meth:`confirm`), and unmasks
only when more than ``(n + colluders) / 2`` nodes signed exactly those sets
(:mod:`fedaiot.secagg.authentication`). Without an identity it trusts the server to relay
faithfully, as the honest-but-curious model assumes.

What the caller must do: create one :class:`SecAggClient` per round from the server's
:class:`~fedaiot.secagg.setup.RoundSetup`, call the stages in order, send each result to the
server, and drop the object when the round ends or fails (never reuse it, nor retry a stage; a
retried ``masked_input`` with another vector would leak the difference of the two). Secrets
live in this object's memory only and are dropped after ``unmask``; Python cannot guarantee
that freed memory is wiped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedaiot.secagg import crypto, shamir
from fedaiot.secagg.authentication import Authenticator, NodeIdentity, confirmations_needed
from fedaiot.secagg.errors import (
    AuthenticationError,
    ProtocolViolation,
    SecAggError,
    TooFewSurvivorsError,
)
from fedaiot.secagg.graph import check_unmask_safe
from fedaiot.secagg.messages import (
    SHARE_PLAINTEXT_BYTES,
    Confirmation,
    ConfirmRequest,
    ForwardedShares,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)
from fedaiot.secagg.records import Record, RecordReader
from fedaiot.secagg.setup import RoundSetup

_STATE_FIELDS = (
    "node_id",
    "stage",
    "enc_sk",
    "mask_sk",
    "b",
    "peer_ids",
    "peer_enc",
    "peer_mask",
    "held_owners",
    "held_b",
    "held_sk",
)
_AUTH_STATE = ("colluders", "confirmed_survivors", "confirmed_dropped")

SEED_BYTES = 32
_SHARE_AD_LABEL = b"fedaiot-secagg-share"


def share_associated_data(setup: RoundSetup, sender: int, recipient: int) -> bytes:
    """What a share ciphertext is bound to: the round context (round id, nonce and every other
    setup field), the sender and the recipient."""
    return (
        _SHARE_AD_LABEL + setup.context + sender.to_bytes(8, "big") + recipient.to_bytes(8, "big")
    )


class SecAggClient:
    """One node in one round: :meth:`advertise`, :meth:`share_keys`, :meth:`masked_input`,
    (with an identity) :meth:`confirm`, and :meth:`unmask`, in this order, each exactly once.

    ``colluders``: how many nodes of the round may side with the server; with an identity,
    unmasking needs confirmations from more than ``(n + colluders) / 2`` nodes.
    """

    def __init__(
        self,
        node_id: int,
        setup: RoundSetup,
        identity: NodeIdentity | None = None,
        colluders: int = 0,
    ) -> None:
        if node_id not in setup.node_ids:
            raise ProtocolViolation(f"node {node_id} is not among the round's node ids")
        if identity is None and setup.identities:
            raise ProtocolViolation(
                f"node {node_id}: the round asks for signed key advertisements and this node "
                "has no identity key"
            )
        self.node_id = node_id
        self.setup = setup
        self.auth = Authenticator(identity, setup, node_id) if identity is not None else None
        self.colluders = colluders
        self._confirmed: tuple[list[int], list[int]] | None = None
        self.neighbours = setup.graph[node_id]
        self._stage = 0
        self._enc_sk: X25519PrivateKey | None = None
        self._mask_sk: X25519PrivateKey | None = None
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        self._b: bytes | None = None
        # owner -> (share of owner's b, share of owner's mask key), this node's own included.
        self._held: dict[int, tuple[bytes, bytes]] = {}

    def _enter(self, stage: int, round_id: int, what: str) -> None:
        if self._stage != stage:
            raise ProtocolViolation(
                f"node {self.node_id}: {what} out of order (stage {stage}, but the node is at "
                f"stage {self._stage}); a stage runs once per round"
            )
        if round_id != self.setup.round_id:
            raise ProtocolViolation(
                f"node {self.node_id}: {what} carries round_id {round_id}, this round is "
                f"{self.setup.round_id} (a replay from another round?)"
            )
        self._stage = stage + 1

    def advertise(self) -> KeyAdvert:
        """Stage 1: two fresh X25519 key pairs, one to encrypt shares, one to agree masks."""
        self._enter(0, self.setup.round_id, "advertise")
        self._enc_sk, self._mask_sk = crypto.generate_private_key(), crypto.generate_private_key()
        enc, mask = crypto.public_bytes(self._enc_sk), crypto.public_bytes(self._mask_sk)
        signature = self.auth.sign_advert(enc, mask) if self.auth else b""
        return KeyAdvert(self.node_id, self.setup.round_id, enc, mask, signature)

    def share_keys(self, neighbour_keys: NeighbourKeys) -> ShareBundle:
        """Stage 3: Shamir-share a fresh self-mask seed and the mask private key among the
        neighbours that advertised and this node; encrypt each neighbour's shares to it."""
        self._enter(1, neighbour_keys.round_id, "share_keys")
        assert self._enc_sk is not None and self._mask_sk is not None
        peers = dict(neighbour_keys.keys)
        strangers = sorted(set(peers) - self.neighbours)
        if strangers:
            raise ProtocolViolation(
                f"node {self.node_id}: keys of {strangers}, which are not its neighbours"
            )
        if self.auth is not None:
            self.auth.check_adverts(peers, neighbour_keys.signatures)
        t = self.setup.threshold
        if len(peers) + 1 < t:
            raise TooFewSurvivorsError(
                f"node {self.node_id}: only {len(peers)} neighbours advertised keys; its shares "
                f"need {t - 1} neighbours besides itself (threshold {t})"
            )
        self._peers = peers
        self._b = os.urandom(SEED_BYTES)
        holders = [*sorted(peers), self.node_id]
        xs = {self.setup.share_id(h): h for h in holders}
        b_shares = shamir.split(self._b, t, list(xs))
        sk_shares = shamir.split(crypto.private_bytes(self._mask_sk), t, list(xs))
        held = {xs[x]: (b_shares[x], sk_shares[x]) for x in xs}
        self._held = {self.node_id: held[self.node_id]}
        ctx = self.setup.context
        ciphertexts = {}
        for j, (enc_pub, _) in peers.items():
            key = crypto.agree(self._enc_sk, enc_pub, crypto.ENC_INFO, ctx)
            header = self.node_id.to_bytes(8, "big") + j.to_bytes(8, "big")
            ad = share_associated_data(self.setup, self.node_id, j)
            ciphertexts[j] = crypto.seal(key, header + held[j][0] + held[j][1], ad)
        return ShareBundle(self.node_id, self.setup.round_id, ciphertexts)

    def _open_shares(self, forwarded: ForwardedShares) -> None:
        assert self._enc_sk is not None
        for j, sealed in forwarded.ciphertexts.items():
            if j not in self._peers:
                raise ProtocolViolation(
                    f"node {self.node_id}: a share from node {j}, which is not a neighbour "
                    "whose keys it was sent"
                )
            key = crypto.agree(self._enc_sk, self._peers[j][0], crypto.ENC_INFO, self.setup.context)
            try:
                plain = crypto.open_sealed(
                    key, sealed, share_associated_data(self.setup, j, self.node_id)
                )
            except AuthenticationError as exc:
                raise AuthenticationError(f"node {self.node_id}: from node {j}: {exc}") from None
            header = j.to_bytes(8, "big") + self.node_id.to_bytes(8, "big")
            if len(plain) != SHARE_PLAINTEXT_BYTES or plain[:16] != header:
                raise ProtocolViolation(f"node {self.node_id}: malformed share from node {j}")
            cut = 16 + shamir.SHARE_BYTES
            self._held[j] = (plain[16:cut], plain[cut:])

    def check_masking(self, forwarded: ForwardedShares) -> None:
        """Whether :meth:`masked_input` can run on ``forwarded``: raises what it would raise
        about the round, the stage and the shares (opening and authenticating each), without
        moving to the next stage. A node that trains only after this holds never spends its
        budget on a round it cannot mask."""
        if self._stage != 2 or forwarded.round_id != self.setup.round_id:
            raise ProtocolViolation(
                f"node {self.node_id}: masked_input for round {forwarded.round_id} at stage "
                f"{self._stage}; this node is at round {self.setup.round_id} and masks once"
            )
        if len(forwarded.ciphertexts) + 1 < self.setup.threshold:
            raise TooFewSurvivorsError(
                f"node {self.node_id}: shares arrived from only {len(forwarded.ciphertexts)} "
                f"neighbours; its mask could not be removed with threshold {self.setup.threshold}"
            )
        self._open_shares(forwarded)

    def masked_input(
        self, forwarded: ForwardedShares, vector: npt.ArrayLike, weight: float
    ) -> MaskedInput:
        """Stage 5: mask ``concat(vector * weight, [weight])``, quantised.

        Adds ``PRG(b)`` and, for each neighbour ``j`` whose shares arrived, ``+PRG(s_ij)`` if
        this node's id is smaller, else ``-PRG(s_ij)``. Every forwarded share is decrypted and
        authenticated first (:class:`AuthenticationError` names the sender). Raises
        :class:`SecAggError` for a vector of the wrong shape or length, NaN/inf, a negative or
        non-finite weight, or a value over ``max_abs``.
        """
        self._enter(2, forwarded.round_id, "masked_input")
        assert self._mask_sk is not None and self._b is not None
        setup, t = self.setup, self.setup.threshold
        if len(forwarded.ciphertexts) + 1 < t:
            raise TooFewSurvivorsError(
                f"node {self.node_id}: shares arrived from only {len(forwarded.ciphertexts)} "
                f"neighbours; its mask could not be removed with threshold {t}"
            )
        x = np.asarray(vector, dtype=np.float64)
        if x.shape != (setup.vector_length,):
            raise SecAggError(
                f"node {self.node_id}: vector has shape {x.shape}, the round expects "
                f"({setup.vector_length},)"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise SecAggError(f"node {self.node_id}: weight must be finite and >= 0, got {weight}")
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise SecAggError(f"node {self.node_id}: vector[{bad[0]}] is {float(x[bad[0]])}")
        self._open_shares(forwarded)
        try:
            y = setup.quantizer.encode(np.append(x * weight, weight))
        except SecAggError as exc:
            raise SecAggError(
                f"node {self.node_id}: {exc} (index {setup.vector_length} is the weight)"
            ) from None
        m = setup.modulus_bits
        np.add(y, crypto.expand(self._b, setup.masked_length, m), out=y)
        for j in forwarded.ciphertexts:
            seed = crypto.agree(self._mask_sk, self._peers[j][1], crypto.MASK_INFO, setup.context)
            mask = crypto.expand(seed, setup.masked_length, m)
            (np.add if self.node_id < j else np.subtract)(y, mask, out=y)
        if m < 64:
            np.bitwise_and(y, setup.quantizer.mask, out=y)
        return MaskedInput(self.node_id, setup.round_id, y)

    def confirm(self, request: ConfirmRequest) -> Confirmation:
        """Stage 6b (authenticated rounds): sign the survivor and dropped sets, once, after
        the checks :meth:`unmask` makes; the node will unmask only for these same sets."""
        if self.auth is None:
            raise ProtocolViolation(f"node {self.node_id}: confirmations need an identity key")
        self._enter(3, request.round_id, "confirm")
        self._check_request(set(request.survivors), set(request.dropped))
        self._confirmed = (sorted(request.survivors), sorted(request.dropped))
        signature = self.auth.confirm(request.survivors, request.dropped)
        return Confirmation(self.node_id, self.setup.round_id, signature)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 7: shares of ``b`` for survivors and of the mask key for dropped nodes.

        Raises :class:`ProtocolViolation` if a node is both survivor and dropped, if this node
        is listed as dropped or not as survivor, or an id is unknown;
        :class:`TooFewSurvivorsError` if fewer than ``threshold`` survived;
        :class:`DisconnectedSurvivorsError` if the survivors are not connected in the graph.
        With an identity: :class:`AuthenticationError` unless the sets are the ones it
        confirmed and enough nodes confirmed them (none with a failing signature).
        """
        self._enter(4 if self.auth else 3, request.round_id, "unmask")
        survivors, dropped = set(request.survivors), set(request.dropped)
        self._check_request(survivors, dropped)
        if self.auth is not None:
            if self._confirmed != (sorted(survivors), sorted(dropped)):
                raise ProtocolViolation(
                    f"{self.auth.who} refuses to unmask: the survivor sets differ from those "
                    "it confirmed"
                )
            needed = confirmations_needed(len(self.setup.node_ids), self.colluders)
            self.auth.check_confirmations(survivors, dropped, request.confirmations, needed)
        b_shares = {o: s[0] for o, s in self._held.items() if o in survivors}
        sk_shares = {o: s[1] for o, s in self._held.items() if o in dropped}
        self._enc_sk = self._mask_sk = self._b = None
        self._held, self._peers = {}, {}
        return UnmaskShares(self.node_id, self.setup.round_id, b_shares, sk_shares)

    def _check_request(self, survivors: set[int], dropped: set[int]) -> None:
        setup, me = self.setup, self.node_id
        both = sorted(survivors & dropped)
        if both:
            raise ProtocolViolation(
                f"node {me}: refuses to unmask: {both} named both survivor and dropped (the "
                "server would get both masks of a node and learn its input)"
            )
        unknown = sorted((survivors | dropped) - set(setup.node_ids))
        if unknown or me in dropped or me not in survivors:
            raise ProtocolViolation(
                f"node {me}: refuses to unmask: unknown ids {unknown} or itself not a survivor"
            )
        who = f"node {me} refuses to unmask"
        check_unmask_safe(setup.graph, survivors, setup.threshold, who, len(setup.node_ids))

    def export_state(self) -> Record:
        """The node's round secrets as a flat record, for a node whose stages run in separate
        processes (a Flower ClientApp is started afresh for each message).

        Keep it in node-local storage only (Flower's ``Context.state``), never send it, and
        drop it when the round ends: it holds the node's private keys and self-mask seed.
        """
        held = sorted(self._held)
        peers = sorted(self._peers)
        survivors, dropped = self._confirmed or ([], [])
        return {
            "colluders": self.colluders,
            "confirmed_survivors": survivors,
            "confirmed_dropped": dropped,
            "node_id": self.node_id,
            "stage": self._stage,
            "enc_sk": crypto.private_bytes(self._enc_sk) if self._enc_sk else b"",
            "mask_sk": crypto.private_bytes(self._mask_sk) if self._mask_sk else b"",
            "b": self._b or b"",
            "peer_ids": peers,
            "peer_enc": [self._peers[j][0] for j in peers],
            "peer_mask": [self._peers[j][1] for j in peers],
            "held_owners": held,
            "held_b": [self._held[o][0] for o in held],
            "held_sk": [self._held[o][1] for o in held],
        }

    @classmethod
    def restore(
        cls, setup: RoundSetup, state: Mapping[str, Any], identity: NodeIdentity | None = None
    ) -> SecAggClient:
        """The client :meth:`export_state` saved, for the same round's ``setup``; the identity
        is the node's own, loaded afresh (the long-term key is never part of the state)."""
        r = RecordReader(state, "SecAggClient state", (*_STATE_FIELDS, *_AUTH_STATE))
        client = cls(r.int_("node_id"), setup, identity, r.int_("colluders"))
        client._stage = r.int_("stage", 0, 5)
        if client.auth is not None and client._stage >= 4:
            client._confirmed = (r.ints("confirmed_survivors"), r.ints("confirmed_dropped"))
        for name in ("enc_sk", "mask_sk"):
            raw = r.bytes_(name)
            key = crypto.load_private_key(raw) if raw else None
            setattr(client, f"_{name}", key)
        client._b = r.bytes_("b") or None
        peers = r.ints("peer_ids")
        enc = r.bytes_list("peer_enc", count=len(peers))
        mask = r.bytes_list("peer_mask", count=len(peers))
        client._peers = {j: (e, m) for j, e, m in zip(peers, enc, mask, strict=True)}
        owners = r.ints("held_owners")
        b_shares = r.bytes_list("held_b", count=len(owners))
        sk_shares = r.bytes_list("held_sk", count=len(owners))
        client._held = {o: (b, k) for o, b, k in zip(owners, b_shares, sk_shares, strict=True)}
        return client
