"""The SecAgg+ communication graph: who masks with, and holds shares for, whom.

SecAgg+ (Bell et al., CCS 2020) replaces the complete graph of SecAgg (Bonawitz et al., CCS
2017) with a sparse graph of degree ``k = O(log n)``: a node agrees masks with, and secret-
shares its keys to, its ``k`` neighbours only, so each node's work is ``O(k)`` instead of
``O(n)``. Here the graph is a Harary graph ``H_{k,n}`` (a ring where each node is joined to the
``k/2`` nearest nodes on either side) laid on a pseudorandom permutation of the nodes that is
derived (HKDF-SHA256 then AES-256-CTR) from the public round nonce. Every party computes the same
graph from the :class:`~fedaiot.secagg.messages.RoundSetup`; the relation is symmetric, without
self-loops, and ``k``-connected: removing fewer than ``k`` nodes never disconnects it.

The guarantee. The server learns the sum of each connected group of surviving nodes; the
protocol refuses to unmask unless the survivors form a single group (see
:func:`components`), so it learns only the total. A fresh permutation per round means the
neighbourhoods, hence which dropouts would matter, are not known before the round.

What the caller must do: draw the round nonce at random per round (an honest server does; a
server that grinds nonces could pick neighbourhoods), and prefer the default degree, or the
complete graph (``k = n - 1``) for small ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence

from fedaiot.secagg.crypto import GRAPH_INFO, expand, hkdf
from fedaiot.secagg.errors import DisconnectedSurvivorsError, SecAggError, TooFewSurvivorsError

Graph = dict[int, frozenset[int]]
COMPLETE_UP_TO = 8


def default_degree(n: int) -> int:
    """``n - 1`` (complete graph) for ``n <= 8``, else ``2 * ceil(log2 n)`` capped at ``n - 1``.

    E.g. 10 nodes -> 8, 20 -> 10, 50 -> 12, 100 -> 14, 1000 -> 20.
    """
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 nodes, got {n}")
    if n <= COMPLETE_UP_TO:
        return n - 1
    k = 2 * math.ceil(math.log2(n))
    return n - 1 if k >= n - 1 else k


def default_threshold(degree: int) -> int:
    """The smallest valid threshold: more than half of the ``degree + 1`` share holders."""
    return (degree + 1) // 2 + 1


def check_degree(n: int, degree: int) -> None:
    """Raise :class:`SecAggError` unless ``degree`` is ``n - 1`` or even in ``[2, n - 2]``."""
    if degree == n - 1 and n >= 2:
        return
    if degree % 2 or not 2 <= degree < n - 1:
        raise SecAggError(
            f"degree {degree} is invalid for {n} nodes: use an even degree in [2, {n - 2}] "
            f"or {n - 1} (complete graph)"
        )


def neighbours(node_ids: Sequence[int], degree: int, seed: bytes) -> Graph:
    """Each node's neighbour set in the round's graph (deterministic in its arguments)."""
    ids = sorted(node_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise SecAggError("node ids must be distinct")
    check_degree(n, degree)
    if degree == n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    key = hkdf(seed, salt=b"", info=GRAPH_INFO + n.to_bytes(8, "big") + degree.to_bytes(8, "big"))
    rank = expand(key, n)
    ring = [ids[i] for i in sorted(range(n), key=lambda i: (int(rank[i]), ids[i]))]
    adj: dict[int, set[int]] = {u: set() for u in ids}
    for pos, u in enumerate(ring):
        for d in range(1, degree // 2 + 1):
            v = ring[(pos + d) % n]
            adj[u].add(v)
            adj[v].add(u)
    return {u: frozenset(vs) for u, vs in adj.items()}


def components(graph: Graph, nodes: Iterable[int]) -> list[list[int]]:
    """The connected components of the subgraph induced by ``nodes``, largest first."""
    remaining = set(nodes)
    out: list[list[int]] = []
    while remaining:
        start = min(remaining)
        remaining.discard(start)
        stack, seen = [start], [start]
        while stack:
            for v in graph.get(stack.pop(), frozenset()):
                if v in remaining:
                    remaining.discard(v)
                    stack.append(v)
                    seen.append(v)
        out.append(sorted(seen))
    out.sort(key=lambda c: (-len(c), c))
    return out


def check_unmask_safe(
    graph: Graph, survivors: Collection[int], threshold: int, who: str, total: int
) -> None:
    """Refuse to unmask when it would reveal less than one sum over every survivor.

    Both the server and each node check this (a node must not rely on the server): fewer than
    ``threshold`` survivors, or survivors split into groups joined by no mask.
    """
    if len(survivors) < threshold:
        raise TooFewSurvivorsError(
            f"{who}: {len(survivors)} of {total} nodes sent a masked input, fewer than the "
            f"threshold {threshold}"
        )
    groups = components(graph, survivors)
    if len(groups) > 1:
        raise DisconnectedSurvivorsError(
            f"{who}: the {len(survivors)} survivors split into groups of sizes "
            f"{[len(g) for g in groups]} joined by no mask; unmasking would reveal each "
            "group's sum"
        )
