"""Secure aggregation (SecAgg+): correctness, dropouts, what the server sees, and tampering."""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from collections.abc import Collection
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedaiot.secagg import (
    AuthenticationError,
    DisconnectedSurvivorsError,
    ForwardedShares,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    ProtocolViolation,
    Quantizer,
    RoundSetup,
    SecAggClient,
    SecAggError,
    SecAggServer,
    ShareBundle,
    TooFewSurvivorsError,
    UnmaskRequest,
    UnmaskShares,
    crypto,
    default_degree,
    run_round_in_memory,
    shamir,
)
from fedaiot.secagg.graph import components, neighbours

FRAC = 24


def _flip(data: bytes, index: int = -1) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


class Driver:
    """Plays one round stage by stage, keeping every message so a test can alter them."""

    def __init__(self, n: int = 6, length: int = 32, ids: list[int] | None = None, **kw: Any):
        node_ids = ids if ids is not None else [10 + 7 * i for i in range(n)]
        self.setup = RoundSetup.create(node_ids, vector_length=length, max_abs=1e4, **kw)
        self.server = SecAggServer(self.setup)
        self.clients = {i: SecAggClient(i, self.setup) for i in self.setup.node_ids}
        rng = np.random.default_rng(7)
        self.vectors = {i: rng.normal(size=length) for i in self.clients}
        self.weights = {i: float(rng.integers(1, 50)) for i in self.clients}

    def advertise(self, drop: Collection[int] = ()) -> dict[int, NeighbourKeys]:
        self.adverts = [c.advertise() for i, c in self.clients.items() if i not in drop]
        self.keys = self.server.collect_adverts(self.adverts)
        return self.keys

    def share(self, drop: Collection[int] = ()) -> dict[int, ForwardedShares]:
        self.bundles = [
            self.clients[i].share_keys(k) for i, k in self.keys.items() if i not in drop
        ]
        self.forwarded = self.server.collect_shares(self.bundles)
        return self.forwarded

    def mask(self, drop: Collection[int] = ()) -> dict[int, UnmaskRequest]:
        self.masked = [
            self.clients[i].masked_input(f, self.vectors[i], self.weights[i])
            for i, f in self.forwarded.items()
            if i not in drop
        ]
        self.server.collect_masked(self.masked)
        self.requests = self.server.unmask_request()
        return self.requests

    def unmask(self, drop: Collection[int] = ()) -> list[UnmaskShares]:
        self.responses = [
            self.clients[i].unmask(r) for i, r in self.requests.items() if i not in drop
        ]
        return self.responses

    def expected(self) -> tuple[np.ndarray, float]:
        alive = self.server.survivors
        total = np.sum([self.weights[i] * self.vectors[i] for i in alive], axis=0)
        return total, sum(self.weights[i] for i in alive)


def _assert_close(got: np.ndarray, want: np.ndarray, n: int, frac: int = FRAC) -> None:
    """|error| <= n * 2^-(frac+1) per coordinate (quantisation), plus the float64 rounding of
    the plain reference sum (a few ulps of its magnitude, orders of magnitude smaller)."""
    bound = n * 2.0 ** -(frac + 1) + 64 * np.finfo(np.float64).eps * np.abs(want)
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))


# -- correctness -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "frac", "bits"), [(12, 24, 64), (5, 24, 64), (9, 12, 40)])
def test_secure_sum_equals_plain_weighted_sum(n: int, frac: int, bits: int) -> None:
    rng = np.random.default_rng(n)
    vectors = {int(i): rng.normal(scale=3.0, size=500) for i in rng.choice(10**9, n, replace=False)}
    weights = {i: float(rng.integers(1, 200)) for i in vectors}
    got, total = run_round_in_memory(
        vectors, weights, frac_bits=frac, modulus_bits=bits, max_abs=5000.0
    )
    want = np.sum([weights[i] * vectors[i] for i in vectors], axis=0)
    _assert_close(got, want, n, frac)
    assert total == sum(weights.values())  # integer weights are exact in fixed point


def test_weights_travel_masked_and_the_masked_vector_looks_uniform() -> None:
    def p_values() -> tuple[float, float, np.ndarray]:
        d = Driver(n=5, length=8191)
        target = d.setup.node_ids[0]
        d.vectors[target] = np.zeros(8191)  # the least random input there is
        d.advertise()
        d.share()
        d.mask()
        masked = next(m.vector for m in d.masked if m.node_id == target)
        assert masked[-1] != Quantizer(FRAC).encode(np.array([d.weights[target]]))[0]
        all_bytes = np.bincount(masked.view(np.uint8), minlength=256)
        top_bytes = np.bincount((masked >> np.uint64(56)).astype(np.int64), minlength=256)
        return stats.chisquare(all_bytes).pvalue, stats.chisquare(top_bytes).pvalue, masked

    # A uniform vector fails a 1e-3 test with probability 1e-3: only a second failure in a fresh
    # round (probability 1e-6 under uniformity) counts; a real bias fails every time.
    p_all, p_top, first = p_values()
    if min(p_all, p_top) <= 1e-3:
        p_all, p_top, _ = p_values()
    assert p_all > 1e-3 and p_top > 1e-3, (p_all, p_top)
    _, _, second = p_values()  # same zero input, next round
    assert np.mean(first == second) < 0.01


# -- dropouts ----------------------------------------------------------------------------------


def test_dropouts_after_sharing_down_to_exactly_threshold_survivors() -> None:
    d = Driver(n=6)  # complete graph, degree 5, threshold 4
    assert (d.setup.degree, d.setup.threshold) == (5, 4)
    ids = d.setup.node_ids
    d.advertise()
    d.share()
    d.mask(drop=ids[:2])
    assert len(d.server.survivors) == d.setup.threshold
    got, total = d.server.aggregate(d.unmask())
    want, want_total = d.expected()
    _assert_close(got, want, 4)
    assert total == want_total


@pytest.mark.parametrize(
    ("n", "advert", "shares", "masked"),
    [(7, (), (1, 2), (3,)), (8, (0,), (5,), (2,)), (20, (3,), (1, 8), (11, 12))],
)
def test_dropouts_at_every_stage_still_give_the_survivors_sum(
    n: int, advert: tuple[int, ...], shares: tuple[int, ...], masked: tuple[int, ...]
) -> None:
    d = Driver(n=n)
    ids = d.setup.node_ids
    d.advertise()
    d.share(drop=[ids[i] for i in advert])
    d.mask(drop=[ids[i] for i in shares])
    got, total = d.server.aggregate(d.unmask(drop=[ids[i] for i in masked]))
    want, want_total = d.expected()
    assert len(d.server.survivors) == n - len(advert) - len(shares)
    _assert_close(got, want, len(d.server.survivors))
    assert total == want_total


@pytest.mark.parametrize("restart", [False, True])
def test_run_round_in_memory_with_dropouts(restart: bool) -> None:
    """``restart``: every client is rebuilt from its exported state before each stage."""
    rng = np.random.default_rng(3)
    vectors = {i: rng.normal(size=100) for i in range(1, 21)}
    weights = {i: 1.0 + i for i in vectors}
    got, total = run_round_in_memory(
        vectors,
        weights,
        drop_before_advert=[1],
        drop_after_advert=[2],
        drop_after_shares=[3],
        drop_after_masked=[4, 5],
        restart_between_stages=restart,
    )
    alive = [i for i in vectors if i not in (1, 2, 3)]
    _assert_close(got, np.sum([weights[i] * vectors[i] for i in alive], axis=0), len(alive))
    assert total == sum(weights[i] for i in alive)


def test_fewer_survivors_than_threshold_is_refused() -> None:
    d = Driver(n=6)
    d.advertise()
    d.share()
    with pytest.raises(TooFewSurvivorsError, match=r"3 of 6 nodes .* threshold 4"):
        d.mask(drop=d.setup.node_ids[:3])


def test_too_few_unmask_responses_is_refused() -> None:
    d = Driver(n=6)
    d.advertise()
    d.share()
    d.mask(drop=d.setup.node_ids[:1])
    with pytest.raises(TooFewSurvivorsError, match="3 survivors sent their shares"):
        d.server.aggregate(d.unmask(drop=d.setup.node_ids[1:3]))


def test_too_few_adverts_is_refused() -> None:
    with pytest.raises(TooFewSurvivorsError, match="threshold"):
        run_round_in_memory(
            {i: np.zeros(4) for i in range(6)},
            dict.fromkeys(range(6), 1.0),
            drop_before_advert=[0, 1, 2],
        )


def test_survivors_split_in_two_groups_are_refused_by_server_and_clients() -> None:
    d = Driver(n=10, degree=2, threshold=2)  # a ring
    a = d.setup.node_ids[0]
    b = next(x for x in d.setup.node_ids if x != a and x not in d.setup.graph[a])
    d.advertise()
    d.share()
    with pytest.raises(DisconnectedSurvivorsError, match="groups"):
        d.mask(drop=[a, b])
    survivors = [i for i in d.setup.node_ids if i not in (a, b)]
    assert len(components(d.setup.graph, survivors)) == 2
    client = d.clients[survivors[0]]
    with pytest.raises(DisconnectedSurvivorsError, match="refuses to unmask"):
        client.unmask(UnmaskRequest(d.setup.round_id, survivors, [a, b]))


# -- tampering, replays, malformed messages ----------------------------------------------------


def test_tampered_share_ciphertext_fails_authentication_at_the_client() -> None:
    d = Driver(n=6)
    d.advertise()
    fwd = d.share()
    node = d.setup.node_ids[0]
    sender = next(iter(fwd[node].ciphertexts))
    bad = {**fwd[node].ciphertexts, sender: _flip(fwd[node].ciphertexts[sender], 40)}
    with pytest.raises(AuthenticationError, match=f"from node {sender}.*authentication"):
        d.clients[node].masked_input(ForwardedShares(d.setup.round_id, bad), d.vectors[node], 1.0)


def test_ciphertext_sent_to_another_recipient_fails_authentication() -> None:
    d = Driver(n=6)
    d.advertise()
    fwd = d.share()
    a, b, c = d.setup.node_ids[:3]
    stolen = {**fwd[a].ciphertexts, c: fwd[b].ciphertexts[c]}  # c's ciphertext for b, given to a
    with pytest.raises(AuthenticationError, match="authentication"):
        d.clients[a].masked_input(ForwardedShares(d.setup.round_id, stolen), d.vectors[a], 1.0)


def test_tampered_shamir_share_is_caught_by_the_server() -> None:
    d = Driver(n=6)
    d.advertise()
    d.share()
    d.mask()
    responses = d.unmask()
    owner = d.setup.node_ids[3]
    r = responses[0]
    forged = {**r.self_mask_shares, owner: _flip(r.self_mask_shares[owner])}
    responses[0] = dataclasses.replace(r, self_mask_shares=forged)
    with pytest.raises(SecAggError, match=f"node {owner}: inconsistent shares"):
        d.server.aggregate(responses)


def test_tampered_key_share_with_exactly_threshold_shares_is_caught() -> None:
    d = Driver(n=6)
    d.advertise()
    d.share()
    ids = d.setup.node_ids
    d.mask(drop=ids[:2])  # 4 survivors = threshold: no spare share to cross-check
    responses = d.unmask()
    r = responses[0]
    forged = {**r.key_shares, ids[0]: _flip(r.key_shares[ids[0]])}
    responses[0] = dataclasses.replace(r, key_shares=forged)
    with pytest.raises(SecAggError, match="inconsistent shares"):
        d.server.aggregate(responses)


def test_wrong_masked_vectors_are_refused() -> None:
    d = Driver(n=6, length=32)
    d.advertise()
    fwd = d.share()
    node = d.setup.node_ids[0]
    with pytest.raises(SecAggError, match=r"shape \(31,\)"):
        d.clients[node].masked_input(fwd[node], np.zeros(31), 1.0)
    for cut in (True, False):
        d = Driver(n=6, length=32)
        d.advertise()
        fwd = d.share()
        good = d.clients[node].masked_input(fwd[node], np.zeros(32), 1.0)
        vector: Any = good.vector[:-1] if cut else good.vector.astype(np.float64)
        with pytest.raises(SecAggError, match="masked vector from node"):
            d.server.collect_masked([dataclasses.replace(good, vector=vector)])


@pytest.mark.parametrize(
    ("vector", "weight", "match"),
    [
        (np.full(32, np.nan), 1.0, "nan"),
        (np.full(32, 2e4), 1.0, "over the bound"),
        (np.ones(32), float("inf"), "weight"),
        (np.ones(32), 2e4, r"index 32 is the weight"),
    ],
)
def test_bad_inputs_are_refused_by_the_client(
    vector: np.ndarray, weight: float, match: str
) -> None:
    d = Driver(n=6, length=32)
    d.advertise()
    fwd = d.share()
    node = d.setup.node_ids[0]
    with pytest.raises(SecAggError, match=match):
        d.clients[node].masked_input(fwd[node], vector, weight)


def test_messages_from_an_earlier_round_are_refused() -> None:
    old = Driver(n=6)
    old.advertise()
    old_fwd = old.share()
    old.mask()
    new = Driver(ids=list(old.setup.node_ids))
    with pytest.raises(ProtocolViolation, match="replay"):
        SecAggServer(new.setup).collect_adverts(old.adverts)
    new.advertise()
    new.share()
    a, b = new.setup.node_ids[:2]
    with pytest.raises(ProtocolViolation, match="replay"):
        new.clients[a].masked_input(old_fwd[a], new.vectors[a], 1.0)
    # The same ciphertexts relabelled with the new round id: bound to the old round's context.
    relabelled = ForwardedShares(new.setup.round_id, old_fwd[b].ciphertexts)
    with pytest.raises(AuthenticationError, match="authentication"):
        new.clients[b].masked_input(relabelled, new.vectors[b], 1.0)
    with pytest.raises(ProtocolViolation, match="replay"):
        new.server.collect_masked(old.masked)


def test_duplicate_unknown_and_out_of_order_messages_are_refused() -> None:
    d = Driver(n=6)
    a = d.clients[d.setup.node_ids[0]].advertise()
    server = SecAggServer(d.setup)
    with pytest.raises(ProtocolViolation, match="duplicate"):
        server.collect_adverts([a, a])
    server = SecAggServer(d.setup)
    with pytest.raises(ProtocolViolation, match="unknown node 999"):
        server.collect_adverts([dataclasses.replace(a, node_id=999)])
    with pytest.raises(ProtocolViolation, match="out of order"):
        d.clients[d.setup.node_ids[1]].unmask(UnmaskRequest(d.setup.round_id, [], []))


def test_client_refuses_an_unmask_request_that_would_reveal_an_input() -> None:
    d = Driver(n=6)
    d.advertise()
    d.share()
    requests = d.mask()
    ids = d.setup.node_ids
    me, victim = ids[0], ids[1]
    both = UnmaskRequest(d.setup.round_id, list(ids), [victim])
    with pytest.raises(ProtocolViolation, match=f"{victim}.*both survivor and dropped"):
        d.clients[me].unmask(both)
    few = UnmaskRequest(d.setup.round_id, list(ids[:3]), list(ids[3:]))
    with pytest.raises(TooFewSurvivorsError, match="fewer than the threshold"):
        d.clients[ids[1]].unmask(few)
    assert requests[ids[2]].dropped == []


# -- records -----------------------------------------------------------------------------------


def test_every_message_round_trips_through_its_record() -> None:
    d = Driver(n=6)
    d.advertise()
    d.share()
    d.mask()
    d.unmask()
    assert RoundSetup.from_record(d.setup.to_record()) == d.setup
    msgs: list[Any] = [*d.adverts, *d.keys.values(), *d.bundles, *d.forwarded.values()]
    msgs += [*d.requests.values(), *d.responses]
    for msg in msgs:
        assert type(msg).from_record(msg.to_record()) == msg
    m = d.masked[0]
    back = MaskedInput.from_record(m.to_record())
    assert back.node_id == m.node_id and np.array_equal(back.vector, m.vector)


@pytest.mark.parametrize(
    ("cls", "record", "match"),
    [
        (
            KeyAdvert,
            {"node_id": 1, "round_id": 2, "enc_public": b"x" * 31, "mask_public": b"y" * 32},
            r"KeyAdvert\.enc_public: expected 32 bytes",
        ),
        (
            KeyAdvert,
            {"node_id": "1", "round_id": 2, "enc_public": b"x" * 32, "mask_public": b"y" * 32},
            r"KeyAdvert\.node_id: expected int",
        ),
        (
            ShareBundle,
            {"node_id": 1, "round_id": 2, "recipients": [3, 4], "ciphertexts": [b""]},
            r"ShareBundle\.ciphertexts: expected 2 elements",
        ),
        (
            MaskedInput,
            {"node_id": 1, "round_id": 2, "vector": np.zeros(3)},
            r"MaskedInput\.vector: expected .* uint64",
        ),
        (
            UnmaskRequest,
            {"round_id": 2, "survivors": [1, 1], "dropped": []},
            r"UnmaskRequest\.survivors: ids must be distinct",
        ),
        (UnmaskShares, {"node_id": 1, "round_id": 2}, r"UnmaskShares: missing fields"),
        (
            NeighbourKeys,
            {"round_id": -1, "neighbour_ids": [], "enc_publics": [], "mask_publics": []},
            r"NeighbourKeys\.round_id: -1 is outside",
        ),
    ],
)
def test_from_record_names_the_bad_field(cls: Any, record: dict[str, Any], match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        cls.from_record(record)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"threshold": 3}, "must exceed half"),
        ({"threshold": 7}, "at most 6"),
        ({"degree": 3}, "degree 3 is invalid"),
        ({"max_abs": 1e12}, "could wrap"),
    ],
)
def test_setup_refuses_unsafe_parameters(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        RoundSetup.create(list(range(6)), vector_length=4, **kw)


def test_setup_refuses_two_nodes() -> None:
    with pytest.raises(SecAggError, match="at least 3 nodes"):
        RoundSetup.create([1, 2], vector_length=4)


# -- building blocks ---------------------------------------------------------------------------


def test_shamir_any_threshold_shares_recover_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3, 32) == secret
    assert shamir.combine(shares, 3, 32) == secret  # all 5, the extra 2 cross-checked
    with pytest.raises(SecAggError, match="need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3, 32)
    with pytest.raises(SecAggError, match="inconsistent shares"):
        shamir.combine({**shares, 4: _flip(shares[4])}, 3, 32)
    long = b"\xff" * 64
    assert shamir.combine(shamir.split(long, 2, [7, 9]), 2, 64) == long
    with pytest.raises(SecAggError, match="0 is the secret"):
        shamir.split(secret, 2, [0, 1, 2])


@pytest.mark.parametrize("n", [3, 8, 9, 10, 20, 50, 101])
def test_graph_is_symmetric_regular_and_connected(n: int) -> None:
    ids = sorted(secrets.randbelow(2**64) for _ in range(n))
    k = default_degree(n)
    seed = secrets.token_bytes(32)
    g = neighbours(ids, k, seed)
    assert set(g) == set(ids)
    for u, vs in g.items():
        assert u not in vs and len(vs) == k
        assert all(u in g[v] for v in vs)
    assert len(components(g, ids)) == 1
    assert neighbours(ids, k, seed) == g  # every party computes the same graph
    if k < n - 1:
        assert neighbours(ids, k, secrets.token_bytes(32)) != g
    assert (k == n - 1) == (n <= 9)


def test_quantizer_round_trip_and_range_errors() -> None:
    q = Quantizer(frac_bits=16, modulus_bits=32, max_abs=100.0)
    x = np.array([0.0, 1.0, -1.0, 99.99, -100.0, 1e-9, -3.14159])
    enc = q.encode(x)
    assert enc.dtype == np.uint64 and int(enc.max()) < 2**32
    assert np.all(np.abs(q.decode(enc) - x) <= 2.0**-17)
    total = sum((q.encode(x) for _ in range(5)), start=np.zeros(len(x), np.uint64))
    assert np.all(np.abs(q.decode(total) - 5 * x) <= q.error_bound(5))
    with pytest.raises(SecAggError, match="index 2 is nan"):
        q.encode(np.array([1.0, 2.0, np.nan]))
    with pytest.raises(SecAggError, match="index 1 is inf"):
        q.encode(np.array([1.0, np.inf]))
    with pytest.raises(SecAggError, match=r"index 1 is -100\.5, over the bound 100\.0"):
        q.encode(np.array([1.0, -100.5]))
    q.check_capacity(100.0, 300)
    with pytest.raises(SecAggError, match=r"a sum of 400 values of magnitude 100\.0 could wrap"):
        q.check_capacity(100.0, 400)
    with pytest.raises(SecAggError, match="over the bound"):
        Quantizer(frac_bits=24).encode(np.array([2.0**39]))


def test_prg_and_aead_primitives() -> None:
    seed = secrets.token_bytes(32)
    a = crypto.expand(seed, 1000)
    assert np.array_equal(a, crypto.expand(seed, 1000))
    assert np.array_equal(a[:10], crypto.expand(seed, 10))
    assert not np.array_equal(a, crypto.expand(secrets.token_bytes(32), 1000))
    assert int(crypto.expand(seed, 1000, 20).max()) < 2**20
    key = secrets.token_bytes(32)
    sealed = crypto.seal(key, b"share", b"ad")
    assert crypto.open_sealed(key, sealed, b"ad") == b"share"
    with pytest.raises(AuthenticationError, match="authentication"):
        crypto.open_sealed(key, sealed, b"other ad")
    k1, k2 = crypto.generate_private_key(), crypto.generate_private_key()
    assert crypto.agree(k1, crypto.public_bytes(k2), b"i", b"s") == crypto.agree(
        k2, crypto.public_bytes(k1), b"i", b"s"
    )
    assert crypto.agree(k1, crypto.public_bytes(k2), b"i", b"s") != crypto.agree(
        k1, crypto.public_bytes(k2), b"i", b"other round"
    )
    with pytest.raises(ProtocolViolation, match="invalid"):
        crypto.agree(k1, bytes(32), b"i", b"s")  # a low-order point
