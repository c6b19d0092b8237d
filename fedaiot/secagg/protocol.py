"""Driving a whole SecAgg+ round in memory, for tests, benchmarks and simulations.

:func:`run_round_in_memory` plays the server and every node in one process and passes each
message through its record form (as Flower would carry it), so it exercises exactly the code a
deployment runs, minus the network. Dropouts are simulated by leaving a node's messages out from
a given stage on. It offers no privacy by itself (one process sees everything): it exists to
check correctness and cost.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt

from fedaiot.secagg.authentication import NodeIdentity
from fedaiot.secagg.client import SecAggClient
from fedaiot.secagg.errors import SecAggError
from fedaiot.secagg.records import Record, record_size
from fedaiot.secagg.server import SecAggServer
from fedaiot.secagg.setup import RoundSetup


class _Message(Protocol):
    def to_record(self) -> Record: ...
    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Self: ...


M = TypeVar("M", bound=_Message)


@dataclass
class RoundTrace:
    """What a round cost: payload bytes each node sent and received, and seconds spent by the
    nodes (all together) and by the server."""

    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    setup: RoundSetup | None = None


def _wire(msg: M, trace: RoundTrace | None, node: int, sent: bool) -> M:
    """Carry a message through its record form, counting its bytes for ``node``."""
    record = msg.to_record()
    if trace is not None:
        book = trace.sent if sent else trace.received
        book[node] = book.get(node, 0) + record_size(record)
    return type(msg).from_record(record)


def run_round_in_memory(
    vectors: Mapping[int, npt.ArrayLike],
    weights: Mapping[int, float],
    *,
    threshold: int | None = None,
    degree: int | None = None,
    drop_before_advert: Collection[int] = (),
    drop_after_advert: Collection[int] = (),
    drop_after_shares: Collection[int] = (),
    drop_after_masked: Collection[int] = (),
    frac_bits: int = 24,
    modulus_bits: int = 64,
    max_abs: float = 1e6,
    round_id: int | None = None,
    trace: RoundTrace | None = None,
    restart_between_stages: bool = False,
    identities: Mapping[int, NodeIdentity] | None = None,
    colluders: int = 0,
) -> tuple[npt.NDArray[np.float64], float]:
    """One full round over ``vectors`` (node id -> 1-D array, all of one length) and ``weights``.

    Returns ``(sum_i w_i * x_i, sum_i w_i)`` over the nodes whose masked input arrived, i.e. all
    but those in ``drop_before_advert``, ``drop_after_advert`` and ``drop_after_shares``. Nodes
    in ``drop_after_masked`` are summed but do not help unmask. ``threshold`` and ``degree``
    default to :func:`~fedaiot.secagg.graph.default_threshold` and
    :func:`~fedaiot.secagg.graph.default_degree`. With ``restart_between_stages`` every client
    is rebuilt from its exported state before each stage, as a Flower node is. With
    ``identities`` (node id -> its :class:`NodeIdentity`) the round is authenticated: signed
    advertisements and the survivor-set confirmations, needing more than ``(n + colluders) /
    2`` of them; nodes in ``drop_after_masked`` confirm nothing. Raises what the stages raise.
    """
    if set(vectors) != set(weights):
        raise SecAggError("vectors and weights must have the same node ids")
    lengths = {np.asarray(v).shape for v in vectors.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise SecAggError(f"vectors must be 1-D and of one length, got shapes {sorted(lengths)}")
    setup = RoundSetup.create(
        list(vectors),
        vector_length=next(iter(lengths))[0],
        threshold=threshold,
        degree=degree,
        frac_bits=frac_bits,
        modulus_bits=modulus_bits,
        max_abs=max_abs,
        round_id=round_id,
        identities=[identities[i].name for i in vectors] if identities else (),
    )
    setup = _wire(setup, None, 0, False)
    who = dict(identities or {})
    if trace is not None:
        trace.setup = setup
    server = SecAggServer(setup)
    gone = set(drop_before_advert)
    clock = time.perf_counter

    def clients_do(step: Any, inbox: Mapping[int, Any]) -> list[Any]:
        start, out = clock(), []
        for node, msg in inbox.items():
            if node in gone:
                continue
            if restart_between_stages:
                state = clients[node].export_state()
                clients[node] = SecAggClient.restore(setup, state, who.get(node))
            got = step(clients[node], _wire(msg, trace, node, False))
            out.append(_wire(got, trace, node, True))
        if trace is not None:
            trace.client_seconds += clock() - start
        return out

    def server_does(step: Any, *args: Any) -> Any:
        start = clock()
        result = step(*args)
        if trace is not None:
            trace.server_seconds += clock() - start
        return result

    start = clock()
    clients = {i: SecAggClient(i, setup, who.get(i), colluders) for i in setup.node_ids}
    adverts = [_wire(clients[i].advertise(), trace, i, True) for i in clients if i not in gone]
    if trace is not None:
        trace.client_seconds += clock() - start
    keys = server_does(server.collect_adverts, adverts)
    gone |= set(drop_after_advert)
    bundles = clients_do(SecAggClient.share_keys, keys)
    forwarded = server_does(server.collect_shares, bundles)
    gone |= set(drop_after_shares)
    masked = clients_do(
        lambda c, f: c.masked_input(f, vectors[c.node_id], weights[c.node_id]), forwarded
    )
    server_does(server.collect_masked, masked)
    gone |= set(drop_after_masked)
    if server.authenticated:
        confirmations = clients_do(SecAggClient.confirm, server_does(server.confirm_request))
        server_does(server.collect_confirmations, confirmations)
    requests = server_does(server.unmask_request)
    responses = clients_do(SecAggClient.unmask, requests)
    result: tuple[npt.NDArray[np.float64], float] = server_does(server.aggregate, responses)
    return result
