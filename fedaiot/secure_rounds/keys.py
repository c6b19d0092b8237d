"""Keys advertised one round ahead: what lets a secure round skip its advertising exchange.

A round's unmask request carries the setup of the run's next aggregation, and each node answers
with its shares *and* its fresh public keys for that next round (``secure_rounds.handlers``).
The coordinator keeps them here until the next aggregation starts. That aggregation uses them
only if it is the one they were made for: the same nodes, the same vector length, the same
kind of input. Anything else (another node set, a study's evaluation vector between two
training rounds, a restarted coordinator) starts from a fresh advertising exchange, and the
nodes drop the keys they advertised ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedaiot.secagg import KeyAdvert, RoundSetup


@dataclass(frozen=True)
class Upcoming:
    """What the run's next aggregation will sum: how long a vector, and whether exact integers
    (a distributed-DP share) or fixed-point reals."""

    length: int
    integers: bool


@dataclass(frozen=True)
class Prepared:
    """The next round's setup, the protocol id of each Flower node in it, and the adverts that
    came back with the unmask answers."""

    setup: RoundSetup
    ids: dict[int, int]
    integers: bool
    adverts: list[KeyAdvert] = field(default_factory=list)


@dataclass
class KeyChain:
    """The coordinator's side of the chain, kept across a run's aggregations."""

    upcoming: Upcoming | None = None
    prepared: Prepared | None = None
    # what each Flower node calls itself (simulation; deployed, the roster names them)
    names: dict[int, str] = field(default_factory=dict)

    def take(self, flower_ids: Sequence[int], length: int, integers: bool) -> Prepared | None:
        """The keys advertised for this aggregation, or None (then it advertises afresh).
        Either way they are used at most once."""
        prepared, self.prepared = self.prepared, None
        if prepared is None or not prepared.adverts:
            return None
        fits = (
            set(prepared.ids) == set(flower_ids)
            and prepared.setup.vector_length == length
            and prepared.integers == integers
        )
        return prepared if fits else None
