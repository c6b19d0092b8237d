"""The server's side of one SecAgg+ round.

The guarantee. If the server follows the protocol, :meth:`SecAggServer.aggregate` returns
``sum_i w_i * x_i`` and ``sum_i w_i`` over the *survivors* (the nodes whose masked input arrived),
up to the quantisation error ``|survivors| * 2^-(frac_bits+1)`` per coordinate, and what it saw
along the way reveals nothing more about the individual ``x_i`` or ``w_i`` (see
:mod:`fedaiot.secagg.client` for the conditions). Nodes that drop out at any stage are left out
of the sum; the round still completes while at least ``threshold`` nodes survive each stage and
every survivor and dropped node keeps ``threshold`` share holders among the responding nodes.

In an authenticated round (the setup names an institution per node id) the server relays the
advertisements' signatures with the keys, and between :meth:`collect_masked` and
:meth:`unmask_request` asks the survivors to sign the survivor sets (:meth:`confirm_request`,
:meth:`collect_confirmations`); the unmask request carries those signatures. The server checks
none of them: the nodes do, against the roster they pinned.

What the caller must do: build a fresh :class:`~fedaiot.secagg.setup.RoundSetup` per round
(:meth:`RoundSetup.create`), send it to every node, then pass each stage the list of client
messages that arrived before the stage's deadline (a missing message *is* a dropout) and send
each returned message to its node. Late messages must not be fed to a later stage; once
:meth:`unmask_request` has named a node dropped, its masked input is refused. Any
:class:`~fedaiot.secagg.errors.SecAggError` aborts the round: discard the object and its partial
sum, and run a new round with a new setup.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedaiot.secagg import crypto, shamir
from fedaiot.secagg.errors import (
    ProtocolViolation,
    SecAggError,
    TooFewSurvivorsError,
)
from fedaiot.secagg.graph import check_unmask_safe
from fedaiot.secagg.messages import (
    SHARE_CIPHERTEXT_BYTES,
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
from fedaiot.secagg.setup import RoundSetup


class _FromNode(Protocol):
    @property
    def node_id(self) -> int: ...
    @property
    def round_id(self) -> int: ...


class SecAggServer:
    """The server in one round: :meth:`collect_adverts`, :meth:`collect_shares`,
    :meth:`collect_masked`, (authenticated rounds) :meth:`confirm_request` and
    :meth:`collect_confirmations`, :meth:`unmask_request`, :meth:`aggregate`, in this order.

    Attributes ``active``, ``sharers`` and ``survivors`` hold the nodes left after stages 1, 3
    and 5; ``excluded`` maps each node left out to the reason.
    """

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self.graph = setup.graph
        self.authenticated = bool(setup.identities)
        self._order = [
            "collect_adverts",
            "collect_shares",
            "collect_masked",
            *(["confirm_request", "collect_confirmations"] if self.authenticated else []),
            "unmask_request",
            "aggregate",
        ]
        self._confirmations: dict[int, bytes] = {}
        self._stage = 0
        self._adverts: dict[int, KeyAdvert] = {}
        self.active: frozenset[int] = frozenset()
        self.sharers: frozenset[int] = frozenset()
        self.survivors: frozenset[int] = frozenset()
        self.excluded: dict[int, str] = {}
        self._sum = np.zeros(setup.masked_length, dtype=np.uint64)

    def _enter(self, what: str) -> None:
        expected = self._order[self._stage] if self._stage < len(self._order) else "nothing"
        if expected != what:
            raise ProtocolViolation(f"server: {what} out of order (expected {expected})")
        self._stage += 1

    def _accept(self, messages: Sequence[_FromNode], allowed: Iterable[int], what: str) -> None:
        """Refuse replays, unknown or unexpected senders and duplicates."""
        allowed, seen = frozenset(allowed), set[int]()
        for msg in messages:
            if msg.round_id != self.setup.round_id:
                raise ProtocolViolation(
                    f"server: {what} from node {msg.node_id} carries round_id {msg.round_id}, "
                    f"this round is {self.setup.round_id} (a replay from another round?)"
                )
            if msg.node_id not in allowed:
                known = "unknown" if msg.node_id not in self.setup.node_ids else "unexpected"
                raise ProtocolViolation(f"server: {what} from {known} node {msg.node_id}")
            if msg.node_id in seen:
                raise ProtocolViolation(f"server: duplicate {what} from node {msg.node_id}")
            seen.add(msg.node_id)

    def _keep(self, arrived: set[int], before: Iterable[int], stage: str) -> frozenset[int]:
        """Drop, repeatedly, nodes with fewer than ``threshold - 1`` neighbours left (their
        shares could never be recovered); raise if fewer than ``threshold`` remain."""
        for node in sorted(set(before) - arrived):
            self.excluded.setdefault(node, f"no message at {stage}")
        keep, need = set(arrived), self.setup.threshold - 1
        while low := {i for i in keep if len(self.graph[i] & keep) < need}:
            keep -= low
            for node in low:
                self.excluded[node] = f"fewer than {need} neighbours left at {stage}"
        if len(keep) < self.setup.threshold:
            raise TooFewSurvivorsError(
                f"server: {len(keep)} of {len(self.setup.node_ids)} nodes are left at {stage} "
                f"({len(arrived)} messages arrived), fewer than the threshold "
                f"{self.setup.threshold}"
            )
        return frozenset(keep)

    def collect_adverts(self, adverts: Sequence[KeyAdvert]) -> dict[int, NeighbourKeys]:
        """Stage 2: for each remaining node, its advertising neighbours' public keys."""
        self._enter("collect_adverts")
        self._accept(adverts, self.setup.node_ids, "KeyAdvert")
        for a in adverts:
            if len(a.enc_public) != crypto.KEY_BYTES or len(a.mask_public) != crypto.KEY_BYTES:
                raise ProtocolViolation(f"server: KeyAdvert from node {a.node_id}: bad key length")
        self._adverts = {a.node_id: a for a in adverts}
        self.active = self._keep(set(self._adverts), self.setup.node_ids, "key advertising")
        rid, adv = self.setup.round_id, self._adverts
        return {
            i: NeighbourKeys(
                rid,
                {j: (adv[j].enc_public, adv[j].mask_public) for j in self.graph[i] & self.active},
                {j: adv[j].signature for j in self.graph[i] & self.active if adv[j].signature},
            )
            for i in sorted(self.active)
        }

    def collect_shares(self, bundles: Sequence[ShareBundle]) -> dict[int, ForwardedShares]:
        """Stage 4: route the share ciphertexts; each node gets those addressed to it."""
        self._enter("collect_shares")
        self._accept(bundles, self.active, "ShareBundle")
        for b in bundles:
            expected = self.graph[b.node_id] & self.active
            if set(b.ciphertexts) != expected:
                raise ProtocolViolation(
                    f"server: ShareBundle from node {b.node_id} is addressed to "
                    f"{sorted(b.ciphertexts)}, expected its neighbours {sorted(expected)}"
                )
            if any(len(c) != SHARE_CIPHERTEXT_BYTES for c in b.ciphertexts.values()):
                raise ProtocolViolation(f"server: ShareBundle from node {b.node_id}: bad length")
        by_sender = {b.node_id: b.ciphertexts for b in bundles}
        self.sharers = self._keep(set(by_sender), self.active, "key sharing")
        return {
            i: ForwardedShares(
                self.setup.round_id, {j: by_sender[j][i] for j in self.graph[i] & self.sharers}
            )
            for i in sorted(self.sharers)
        }

    def collect_masked(self, inputs: Sequence[MaskedInput]) -> None:
        """Stage 5: check and add up the masked vectors (mod ``2^modulus_bits``)."""
        self._enter("collect_masked")
        self._accept(inputs, self.sharers, "MaskedInput")
        length, m = self.setup.masked_length, self.setup.modulus_bits
        for msg in inputs:
            v = msg.vector
            if not isinstance(v, np.ndarray) or v.dtype != np.uint64 or v.shape != (length,):
                shape = getattr(v, "shape", None)
                raise SecAggError(
                    f"server: masked vector from node {msg.node_id} has dtype "
                    f"{getattr(v, 'dtype', type(v))} and shape {shape}; expected uint64 "
                    f"({length},)"
                )
            if m < 64 and bool((v >> np.uint64(m)).any()):
                raise SecAggError(f"server: masked vector from node {msg.node_id} exceeds 2^{m}")
        for msg in inputs:
            np.add(self._sum, msg.vector, out=self._sum)
        self.survivors = frozenset(msg.node_id for msg in inputs)
        for node in sorted(self.sharers - self.survivors):
            self.excluded[node] = "no masked input"

    def _sets(self) -> tuple[list[int], list[int]]:
        s = self.survivors
        check_unmask_safe(self.graph, s, self.setup.threshold, "server", len(self.setup.node_ids))
        return sorted(s), sorted(self.sharers - s)

    def confirm_request(self) -> dict[int, ConfirmRequest]:
        """Stage 6a: ask every survivor to sign the survivor and dropped sets."""
        self._enter("confirm_request")
        survivors, dropped = self._sets()
        return {i: ConfirmRequest(self.setup.round_id, survivors, dropped) for i in survivors}

    def collect_confirmations(self, confirmations: Sequence[Confirmation]) -> None:
        """Stage 6b: keep each survivor's signature, to relay with the unmask request."""
        self._enter("collect_confirmations")
        self._accept(confirmations, self.survivors, "Confirmation")
        self._confirmations = {c.node_id: c.signature for c in confirmations}

    def unmask_request(self) -> dict[int, UnmaskRequest]:
        """Stage 6: ask every survivor for its shares; raise if unmasking would not be safe."""
        self._enter("unmask_request")
        survivors, dropped = self._sets()
        signed = self._confirmations
        return {
            i: UnmaskRequest(self.setup.round_id, survivors, dropped, signed) for i in survivors
        }

    def _recover(self, owner: int, what: str, shares: dict[int, bytes]) -> bytes:
        t = self.setup.threshold
        if len(shares) < t:
            raise TooFewSurvivorsError(
                f"server: only {len(shares)} shares of the {what} of node {owner} arrived, "
                f"{t} are needed"
            )
        try:
            return shamir.combine(shares, t, crypto.KEY_BYTES)
        except SecAggError as exc:
            raise SecAggError(f"server: {what} of node {owner}: {exc}") from None

    def aggregate(self, responses: Sequence[UnmaskShares]) -> tuple[npt.NDArray[np.float64], float]:
        """Stage 8: remove the masks and decode. Returns ``(sum_i w_i x_i, sum_i w_i)``.

        Raises :class:`TooFewSurvivorsError` if some owner lacks ``threshold`` shares,
        :class:`SecAggError` (``"inconsistent shares"``) if extra shares disagree or a rebuilt
        key does not match the advertised one, :class:`ProtocolViolation` for shares a node
        may not give.
        """
        self._enter("aggregate")
        setup, s, d = self.setup, self.survivors, self.sharers - self.survivors
        self._accept(responses, s, "UnmaskShares")
        for r in responses:
            holds = self.graph[r.node_id] | {r.node_id}
            bad_b = set(r.self_mask_shares) - (s & holds)
            bad_sk = set(r.key_shares) - (d & holds)
            if bad_b or bad_sk:
                raise ProtocolViolation(
                    f"server: node {r.node_id} sent self-mask shares of {sorted(bad_b)} and key "
                    f"shares of {sorted(bad_sk)}, which it does not hold or may not reveal"
                )
        if len(responses) < setup.threshold:
            raise TooFewSurvivorsError(
                f"server: {len(responses)} survivors sent their shares, fewer than the "
                f"threshold {setup.threshold}"
            )
        length, m, ctx = setup.masked_length, setup.modulus_bits, setup.context
        total = self._sum.copy()
        for i in sorted(s):
            shares = {
                setup.share_id(r.node_id): r.self_mask_shares[i]
                for r in responses
                if i in r.self_mask_shares
            }
            b = self._recover(i, "self-mask seed", shares)
            np.subtract(total, crypto.expand(b, length, m), out=total)
        for j in sorted(d):
            shares = {
                setup.share_id(r.node_id): r.key_shares[j] for r in responses if j in r.key_shares
            }
            key = crypto.load_private_key(self._recover(j, "mask key", shares))
            if crypto.public_bytes(key) != self._adverts[j].mask_public:
                raise SecAggError(
                    f"server: inconsistent shares: the mask key rebuilt for node {j} does not "
                    "match its advertised public key"
                )
            for i in sorted(self.graph[j] & s):  # i added +PRG(s_ij) if i < j, else -PRG
                seed = crypto.agree(key, self._adverts[i].mask_public, crypto.MASK_INFO, ctx)
                mask = crypto.expand(seed, length, m)
                (np.subtract if i < j else np.add)(total, mask, out=total)
        decoded = setup.quantizer.decode(total)
        self._sum = np.zeros(0, dtype=np.uint64)
        return decoded[: setup.vector_length].copy(), float(decoded[setup.vector_length])
