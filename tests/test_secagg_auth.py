"""Secure aggregation against a malicious server: signed key advertisements checked against a
pinned roster, and survivor sets confirmed before unmasking. Each test plays the server."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedaiot.secagg import (
    AuthenticationError,
    Confirmation,
    ConfirmRequest,
    KeyAdvert,
    NeighbourKeys,
    NodeIdentity,
    ProtocolViolation,
    Roster,
    RoundSetup,
    SecAggClient,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    crypto,
    run_round_in_memory,
    shamir,
)
from fedaiot.secagg.authentication import (
    confirmation_message,
    confirmations_needed,
    openssh_line,
)

NAMES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def _federation(names: list[str] = NAMES) -> tuple[Roster, dict[str, NodeIdentity]]:
    keys = {name: Ed25519PrivateKey.generate() for name in names}
    roster = Roster({name: key.public_key() for name, key in keys.items()})
    return roster, {name: NodeIdentity(name, key, roster) for name, key in keys.items()}


class Round:
    """One authenticated round, played stage by stage so the server's messages can be altered."""

    def __init__(self, n: int = 6, colluders: int = 1, **kw: Any) -> None:
        self.roster, self.identity = _federation(NAMES[:n])
        ids = [11 * (k + 1) for k in range(n)]
        self.name = dict(zip(ids, NAMES[:n], strict=True))
        self.setup = RoundSetup.create(
            ids, vector_length=8, max_abs=1e4, identities=[self.name[i] for i in ids], **kw
        )
        self.server = SecAggServer(self.setup)
        self.clients = {
            i: SecAggClient(i, self.setup, self.identity[self.name[i]], colluders) for i in ids
        }
        rng = np.random.default_rng(3)
        self.vectors = {i: rng.normal(size=8) for i in ids}

    def through_masking(self) -> None:
        adverts = [c.advertise() for c in self.clients.values()]
        self.keys = self.server.collect_adverts(adverts)
        bundles = [self.clients[i].share_keys(k) for i, k in self.keys.items()]
        forwarded = self.server.collect_shares(bundles)
        masked = [
            self.clients[i].masked_input(f, self.vectors[i], 1.0) for i, f in forwarded.items()
        ]
        self.server.collect_masked(masked)


def test_an_authenticated_round_sums_correctly_across_dropouts_and_restarts() -> None:
    _roster, identity = _federation()
    ids = list(range(1, 7))
    rng = np.random.default_rng(1)
    vectors = {i: rng.normal(size=16) for i in ids}
    weights = {i: float(rng.integers(1, 9)) for i in ids}
    got, total = run_round_in_memory(
        vectors,
        weights,
        max_abs=1e4,
        identities=dict(zip(ids, identity.values(), strict=True)),
        colluders=1,
        drop_after_shares=[6],
        restart_between_stages=True,
    )
    alive = ids[:5]
    want = np.sum([weights[i] * vectors[i] for i in alive], axis=0)
    assert np.allclose(got, want, atol=1e-5) and total == sum(weights[i] for i in alive)


def test_a_substituted_public_key_makes_the_node_refuse_the_round() -> None:
    r = Round()
    adverts = [c.advertise() for c in r.clients.values()]
    keys = r.server.collect_adverts(adverts)
    victim, swapped = r.setup.node_ids[0], r.setup.node_ids[2]
    mine = crypto.generate_private_key()  # the server's own key pair, in gamma's place
    relayed = dict(keys[victim].keys)
    relayed[swapped] = (crypto.public_bytes(mine), crypto.public_bytes(mine))
    tampered = dataclasses.replace(keys[victim], keys=relayed)
    with pytest.raises(
        AuthenticationError,
        match=r"node 11 \(alpha\) refuses the round: .*33 "
        r"\(gamma\) are not signed by gamma's identity key",
    ):
        r.clients[victim].share_keys(tampered)
    # honest relays to the others still verify
    assert r.clients[swapped].share_keys(keys[swapped]).node_id == swapped


def test_keys_re_signed_by_a_key_outside_the_roster_or_unsigned_are_refused() -> None:
    r = Round()
    keys = r.server.collect_adverts([c.advertise() for c in r.clients.values()])
    victim, other = r.setup.node_ids[1], r.setup.node_ids[3]
    outsider = Ed25519PrivateKey.generate()
    enc, mask = keys[victim].keys[other]
    from fedaiot.secagg.authentication import advert_message

    forged = outsider.sign(advert_message(r.setup, other, enc, mask))
    signatures = {**keys[victim].signatures, other: forged}
    with pytest.raises(AuthenticationError, match="not signed by delta's identity key"):
        r.clients[victim].share_keys(dataclasses.replace(keys[victim], signatures=signatures))
    r2 = Round()
    keys2 = r2.server.collect_adverts([c.advertise() for c in r2.clients.values()])
    stripped = NeighbourKeys(r2.setup.round_id, keys2[victim].keys)  # no signatures relayed
    with pytest.raises(AuthenticationError, match="are not signed"):
        r2.clients[victim].share_keys(stripped)


def test_a_setup_that_misnames_nodes_is_refused() -> None:
    _roster, identity = _federation(NAMES[:4])
    ids = [1, 2, 3, 4]
    with pytest.raises(SecAggError, match="one distinct institution per node id"):
        RoundSetup.create(ids, vector_length=4, identities=["alpha", "alpha", "beta", "gamma"])
    mallory = RoundSetup.create(
        ids, vector_length=4, identities=["alpha", "beta", "gamma", "mallory"]
    )
    with pytest.raises(AuthenticationError, match="'mallory' is not in the pinned roster"):
        SecAggClient(1, mallory, identity["alpha"])
    swapped = RoundSetup.create(
        ids, vector_length=4, identities=["beta", "alpha", "gamma", "delta"]
    )
    with pytest.raises(ProtocolViolation, match="names its node id 'beta'"):
        SecAggClient(1, swapped, identity["alpha"])
    bare = RoundSetup.create(ids, vector_length=4)
    with pytest.raises(ProtocolViolation, match="names no institution"):
        SecAggClient(1, bare, identity["alpha"])
    named = RoundSetup.create(ids, vector_length=4, identities=NAMES[:4])
    with pytest.raises(ProtocolViolation, match="has no identity key"):
        SecAggClient(1, named)


def _split_views(r: Round) -> tuple[dict[int, ConfirmRequest], list[Confirmation], int]:
    """The server tells half the nodes that the target survived, the other half that it
    dropped: with shares of both of the target's secrets it could unmask the target alone."""
    ids = list(r.setup.node_ids)
    target = ids[-1]
    seen_alive = ConfirmRequest(r.setup.round_id, ids, [])
    seen_dropped = ConfirmRequest(r.setup.round_id, ids[:-1], [target])
    views = {i: (seen_alive if k % 2 else seen_dropped) for k, i in enumerate(ids) if i != target}
    views[target] = seen_alive
    return views, [r.clients[i].confirm(v) for i, v in views.items()], target


def test_nodes_shown_different_survivor_sets_refuse_to_unmask() -> None:
    r = Round(colluders=1)
    r.through_masking()
    r.server.confirm_request()  # the honest requests, replaced below
    views, confirmations, target = _split_views(r)
    signed = {c.node_id: c.signature for c in confirmations}
    # (a) each node is relayed only the confirmations of the sets it was shown: too few
    for node, view in views.items():
        same = {i: sig for i, sig in signed.items() if views[i] == view}
        request = UnmaskRequest(r.setup.round_id, view.survivors, view.dropped, same)
        restarted = SecAggClient.restore(
            r.setup, r.clients[node].export_state(), r.identity[r.name[node]]
        )
        with pytest.raises(AuthenticationError, match=r"3 of 6 nodes confirmed .* 4 are needed"):
            restarted.unmask(request)
    # (b) every signature relayed: the ones over the other sets fail, naming a signer
    node = next(i for i, v in views.items() if target in v.dropped)
    view = views[node]
    everyone = {i: s for i, s in signed.items() if i in view.survivors}
    with pytest.raises(AuthenticationError, match="did not sign the survivor set this node was"):
        r.clients[node].unmask(
            UnmaskRequest(r.setup.round_id, view.survivors, view.dropped, everyone)
        )
    assert confirmations_needed(6, 1) == 4


def test_unmasking_needs_the_sets_the_node_confirmed() -> None:
    r = Round()
    r.through_masking()
    requests = r.server.confirm_request()
    node = r.setup.node_ids[0]
    r.clients[node].confirm(requests[node])
    ids = list(r.setup.node_ids)
    other = UnmaskRequest(r.setup.round_id, ids[:-1], ids[-1:])
    with pytest.raises(ProtocolViolation, match="differ from those it confirmed"):
        r.clients[node].unmask(other)


def test_an_honest_round_of_the_stages_unmasks_with_enough_confirmations() -> None:
    r = Round(colluders=2)
    r.through_masking()
    requests = r.server.confirm_request()
    confirmations = [r.clients[i].confirm(q) for i, q in requests.items()]
    r.server.collect_confirmations(confirmations[:5])  # one never arrives: 5 of 6 suffice
    unmask = r.server.unmask_request()
    shares = [r.clients[i].unmask(q) for i, q in unmask.items()]
    total, weight = r.server.aggregate(shares)
    assert np.allclose(total, np.sum(list(r.vectors.values()), axis=0), atol=1e-5)
    assert weight == 6.0


def test_confirmations_from_another_round_do_not_verify() -> None:
    old, new = Round(), Round()
    new.roster, new.identity = old.roster, old.identity  # one federation, two rounds
    for r in (old, new):
        r.setup = RoundSetup.create(
            list(old.setup.node_ids),
            vector_length=8,
            max_abs=1e4,
            identities=[old.name[i] for i in old.setup.node_ids],
        )
        r.server = SecAggServer(r.setup)
        r.clients = {
            i: SecAggClient(i, r.setup, old.identity[old.name[i]], 1) for i in r.setup.node_ids
        }
        r.vectors = old.vectors
        r.through_masking()
    old_signed = {
        c.node_id: c.signature
        for c in (old.clients[i].confirm(q) for i, q in old.server.confirm_request().items())
    }
    requests = new.server.confirm_request()
    node = new.setup.node_ids[0]
    new.clients[node].confirm(requests[node])
    ids = list(new.setup.node_ids)
    with pytest.raises(AuthenticationError, match="did not sign"):
        new.clients[node].unmask(UnmaskRequest(new.setup.round_id, ids, [], old_signed))


def test_the_roster_fingerprint_ignores_layout_and_a_node_key_must_match_it() -> None:
    roster, _identity = _federation(NAMES[:3])
    lines = {n: openssh_line(k) + f" comment-{n}" for n, k in reversed(roster.keys.items())}
    assert Roster.from_lines(lines).fingerprint == roster.fingerprint
    assert roster.fingerprint.startswith("SHA256:") and len(roster.fingerprint) == 50
    other, _ = _federation(NAMES[:3])
    assert other.fingerprint != roster.fingerprint
    with pytest.raises(SecAggError, match="not the one the pinned roster"):
        NodeIdentity("alpha", Ed25519PrivateKey.generate(), roster)
    ecdsa = ec.generate_private_key(ec.SECP384R1()).public_key()
    line = ecdsa.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    with pytest.raises(SecAggError, match="an identity key must be ssh-ed25519"):
        Roster.from_lines({"alpha": line})


def test_signed_messages_round_trip_and_unsigned_ones_carry_no_signature_field() -> None:
    r = Round(n=4)
    adverts = [c.advertise() for c in r.clients.values()]
    keys = r.server.collect_adverts(adverts)
    for msg in [*adverts, *keys.values(), RoundSetup.from_record(r.setup.to_record())]:
        assert type(msg).from_record(msg.to_record()) == msg
    assert "identities" in r.setup.to_record() and "signature" in adverts[0].to_record()
    plain = SecAggClient(1, RoundSetup.create([1, 2, 3], vector_length=2)).advertise()
    assert set(plain.to_record()) == {"node_id", "round_id", "enc_public", "mask_public"}
    assert KeyAdvert.from_record(plain.to_record()).signature == b""


def _recover_one_input(
    setup: RoundSetup,
    masked: np.ndarray,
    target: int,
    b_shares: dict[int, bytes],
    sk_shares: dict[int, bytes],
    mask_publics: dict[int, bytes],
) -> np.ndarray:
    """What a server holding shares of both of the target's secrets does: unmask it alone."""
    t, ctx, m = setup.threshold, setup.context, setup.modulus_bits
    b = shamir.combine(b_shares, t, 32)
    key = crypto.load_private_key(shamir.combine(sk_shares, t, 32))
    y = masked - crypto.expand(b, setup.masked_length, m)
    for j in setup.graph[target]:
        seed = crypto.agree(key, mask_publics[j], crypto.MASK_INFO, ctx)
        pair = crypto.expand(seed, setup.masked_length, m)
        y = (y + pair) if target > j else (y - pair)  # undo the target's own sign
    return setup.quantizer.decode(y)[: setup.vector_length]


@pytest.mark.parametrize("assumed", [None, 2, 0])
def test_a_split_view_with_two_colluders_reveals_an_input_unless_confirmed(
    assumed: int | None,
) -> None:
    """Six nodes, complete graph, threshold 4; nodes 4 and 5 collude with the server and
    answer both views. Unauthenticated (None), the server recovers node 6's input exactly.
    With confirmations sized for the two colluders, nobody honest unmasks. Assuming fewer
    colluders than there are (0) leaves the attack open: the assumption is the run's."""
    ids, target, colluders = [1, 2, 3, 4, 5, 6], 6, {4, 5}
    _, identity = _federation()
    names = dict(zip(ids, NAMES, strict=True))
    authenticated = assumed is not None
    setup = RoundSetup.create(
        ids, vector_length=4, max_abs=1e4, identities=NAMES if authenticated else ()
    )
    who = {i: identity[names[i]] if authenticated else None for i in ids}
    clients = {i: SecAggClient(i, setup, who[i], assumed or 0) for i in ids}
    server = SecAggServer(setup)
    adverts = [c.advertise() for c in clients.values()]
    keys = server.collect_adverts(adverts)
    forwarded = server.collect_shares([clients[i].share_keys(k) for i, k in keys.items()])
    secret = np.array([0.25, -1.5, 3.0, 0.125])
    masked = clients[target].masked_input(forwarded[target], secret, 1.0)
    for i in ids[:-1]:
        clients[i].masked_input(forwarded[i], np.zeros(4), 1.0)
    View = tuple[list[int], list[int]]
    alive: View = (ids, [])  # shown to 1 and 6: they would reveal node 6's self-mask seed
    gone: View = (ids[:-1], [target])  # shown to 2 and 3: they would reveal node 6's mask key
    honest_view = {1: alive, 6: alive, 2: gone, 3: gone}
    states = {i: clients[i].export_state() for i in colluders}  # a colluder answers twice
    signed: dict[int, dict[int, bytes]] = {}  # by view: id(alive), id(gone)
    for view in (alive, gone):
        confirmations = {}
        if authenticated:
            for i in ids:
                if i in colluders:  # the server holds its key and signs whatever it likes
                    message = confirmation_message(setup, i, *view)
                    confirmations[i] = identity[names[i]].sign(message)
                elif honest_view[i] == view:
                    confirmations[i] = (
                        clients[i].confirm(ConfirmRequest(setup.round_id, *view)).signature
                    )
        signed[id(view)] = confirmations
    b_shares: dict[int, bytes] = {}
    sk_shares: dict[int, bytes] = {}
    for i in ids:
        for view in [alive, gone] if i in colluders else [honest_view[i]]:
            client = clients[i]
            if i in colluders:
                client = SecAggClient.restore(setup, states[i], who[i])
                if authenticated:
                    client.confirm(ConfirmRequest(setup.round_id, *view))
            request = UnmaskRequest(setup.round_id, view[0], view[1], signed[id(view)])
            try:
                shares = client.unmask(request)
            except SecAggError:
                continue
            if target in shares.self_mask_shares:
                b_shares[setup.share_id(i)] = shares.self_mask_shares[target]
            if target in shares.key_shares:
                sk_shares[setup.share_id(i)] = shares.key_shares[target]
    t = setup.threshold
    exposed = len(b_shares) >= t and len(sk_shares) >= t
    assert exposed == (assumed != 2), (len(b_shares), len(sk_shares), t)
    if exposed:
        publics = {a.node_id: a.mask_public for a in adverts}
        got = _recover_one_input(setup, masked.vector, target, b_shares, sk_shares, publics)
        assert np.allclose(got, secret, atol=1e-6)
