"""What a run's nodes disclosed to the coordinator in the clear, for the manifest and the card.

``docs/privacy.md`` lists every field a coordinator receives in the clear and what it can infer
from it; :func:`disclosure` is that list's outcome for one run's configuration, written into
every manifest (``privacy``) and shown on the model card, so a reader of a model knows what its
training revealed without reading the docs.
"""

from __future__ import annotations

from typing import Any

from fedaiot.config.run import RunConfig
from fedaiot.wire.replies import CLEAR_METRICS

NOT_PRIVATE = "NOT PRIVATE: noise and sampling were drawn from the run's seed (seeded-noise)"


def disclosure(cfg: RunConfig) -> dict[str, Any]:
    """The privacy facts of a run: its guarantee, its noise, and what crossed in the clear."""
    secure = cfg.secure_aggregation
    mode = ("private" if cfg.private else "non-private") + ("-secure" if secure else "")
    distributed = cfg.dp_mode == "distributed"
    clear = ["status", "reason code", *CLEAR_METRICS[mode]]
    if not distributed and "epsilon-local" in clear:
        clear.remove("epsilon-local")  # only a distributed round's node has a share alone
    if not secure:
        clear.append("the update itself")
    if not cfg.private:
        guarantee = "none: the run trained without differential privacy"
        noise = "none"
    elif cfg.seeded_noise:
        guarantee = NOT_PRIVATE
        noise = NOT_PRIVATE
    elif distributed:
        guarantee = (
            f"record-level (epsilon, delta)-DP per node's data set, epsilon <= {cfg.epsilon:g}, "
            f"delta {cfg.delta:g}, Skellam RDP accountant, provided at most {cfg.dp_collusion} "
            "node(s) collude with the coordinator; 'epsilon_local' in 'nodes' is what holds if "
            "every other node colluded"
        )
        noise = (
            "distributed: each node's share of Skellam noise (integers) and its Poisson "
            "sampling from ChaCha20 keyed by its OS, added inside secure aggregation"
        )
    else:
        guarantee = (
            f"record-level (epsilon, delta)-DP per node's data set, epsilon <= {cfg.epsilon:g}, "
            f"delta {cfg.delta:g}, PLD accountant; each node's spend is in 'nodes'"
        )
        noise = "Gaussian noise and Poisson sampling from ChaCha20 keyed by the node's OS"
    if not cfg.private:
        weight = "exact example counts" + (" (masked)" if secure else " (in the clear)")
    else:
        weight = (
            f"each data set's size plus Gaussian noise (sd {cfg.count_noise:g}), released once "
            "per data set and charged to its budget" + (", masked" if secure else "")
        )
    return {
        "private": cfg.private and not cfg.seeded_noise,
        "guarantee": guarantee,
        "noise": noise,
        "secure_aggregation": secure,
        "coordinator_saw_per_node": clear,
        "coordinator_saw_in_total": (
            ["the sum of the survivors' noisy integer gradient shares", "of their noisy counts"]
            if distributed
            else ["the weighted sum of the survivors' updates", "the sum of their weights"]
            if secure
            else []
        ),
        "dp_mode": cfg.dp_mode,
        "trust": (
            f"at most {cfg.dp_collusion} node(s) collude with the coordinator; the others run "
            "fedaiot unmodified"
            if distributed
            else "none: each node's own noise protects its records"
            if cfg.private
            else "none"
        ),
        "weights": weight,
        "sample_rate": cfg.sample_rate if cfg.private else None,
        "steps_per_round": (1 if distributed else cfg.steps_per_round) if cfg.private else None,
    }
