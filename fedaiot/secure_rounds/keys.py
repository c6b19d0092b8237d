"""Keys advertised and shared one round ahead: what lets a secure round skip its first two
exchanges.

A round's request to compute (train, or a release's vector) carries the setup of the run's next
aggregation, and each node answers with its masked input *and* its fresh public keys for that
next round; the round's unmask request carries the next round's neighbour keys, and each node
answers with its shares *and* its encrypted key shares for the next round
(``secure_rounds.handlers``). The coordinator keeps both here until the next aggregation
starts, which then begins with the request to compute. It uses them only if it is the one they
were made for: the same nodes, the same vector length, the same kind of input. Anything else
(another node set, a study's evaluation vector between two training rounds, a restarted
coordinator) starts from a fresh advertising exchange, and the nodes drop the keys they made
ahead. Adverts without shares (the round before failed ahead of its unmasking) still save the
advertising exchange, when every node advertised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedaiot.secagg import KeyAdvert, RoundSetup, ShareBundle


@dataclass(frozen=True)
class Upcoming:
    """What the run's next aggregation will sum: how long a vector, and whether exact integers
    (a distributed-DP share) or fixed-point reals."""

    length: int
    integers: bool


@dataclass
class Prepared:
    """The next round's setup, the protocol id of each Flower node in it, the adverts that came
    back with the masked inputs, and the share bundles that came back with the unmask answers
    (None until that exchange ran), with why a node that was asked made none (by Flower id)."""

    setup: RoundSetup
    ids: dict[int, int]
    integers: bool
    adverts: list[KeyAdvert] = field(default_factory=list)
    bundles: list[ShareBundle] | None = None
    problems: dict[int, str] = field(default_factory=dict)


@dataclass
class KeyChain:
    """The coordinator's side of the chain, kept across a run's aggregations."""

    upcoming: Upcoming | None = None
    prepared: Prepared | None = None
    # what each Flower node calls itself (simulation; deployed, the roster names them)
    names: dict[int, str] = field(default_factory=dict)

    def take(self, flower_ids: Sequence[int], length: int, integers: bool) -> Prepared | None:
        """The keys advertised for this aggregation, or None (then it advertises afresh):
        None too unless every node advertised (a round that failed before its unmasking gave
        a node that missed its advert no second chance; afresh, it takes part). Either way
        they are used at most once."""
        prepared, self.prepared = self.prepared, None
        if prepared is None or len(prepared.adverts) < len(prepared.ids):
            return None
        fits = (
            set(prepared.ids) == set(flower_ids)
            and prepared.setup.vector_length == length
            and prepared.integers == integers
        )
        return prepared if fits else None
