"""A securely aggregated round, driven from the ServerApp as Flower message exchanges.

The stages of SecAgg+ (see :mod:`fedaiot.secagg`) run as four exchanges with the sampled nodes:
advertise keys, share keys, compute the input (train, or a release's vector) and send it
masked, answer the unmask request. An authenticated round (every node registered under a
roster name: a deployment) has one more, before unmasking: the nodes sign the survivor sets
they are shown and unmask only when enough of them signed the same sets. In a run's steady
state the first two ride on the round before (the keys on its masked inputs, the shares on its
unmask answers: see :mod:`fedaiot.secure_rounds.keys`), leaving two exchanges a round, three
authenticated. Keys advertised ahead are signed and checked as any advertisement is. The
coordinator learns the weighted sum of the surviving nodes' updates and their total weight,
nothing about any one node's update or example count. A node that drops out at any stage is
left out by the protocol. A round with fewer survivors than the threshold fails cleanly, and
the caller keeps the previous global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.secagg import (
    Confirmation,
    RoundSetup,
    SecAggError,
    SecAggParameters,
    SecAggServer,
    ShareBundle,
    choose,
)
from fedaiot.secure_rounds.keys import KeyChain, Prepared, Upcoming
from fedaiot.secure_rounds.stages import Stages
from fedaiot.secure_rounds.wire import (
    CONFIRM,
    SHARE_KEYS,
    TRAIN_AND_MASK,
    VECTOR_AND_MASK,
    flatten,
    survivor_floor,
    unflatten,
)
from fedaiot.wire.records import ARRAYS, METRICS, ReceivedReply

# Fixed point with 24 fractional bits in Z_2^64: each node's weighted update is exact to 3e-8;
# |update x examples| up to 1e8 per coordinate leaves room for 5,000 nodes without wrapping.
FRAC_BITS, MAX_ABS = 24, 1e8
INTEGER_MAX_ABS = 2.0**52  # a distributed-DP share: exact in float64; 2^10 of them fit Z_2^64
MIN_NODES = 3


@dataclass
class SecureRound:
    """What a round produced: the new global model (None when it failed) and every node's fate."""

    arrays: ArrayRecord | None
    replies: list[ReceivedReply]
    total_weight: float = math.nan
    error: str = ""
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage
    parameters: dict[str, Any] = field(default_factory=dict)  # degree, threshold, threat model
    vector: np.ndarray | None = None  # the unmasked sum, for vector rounds
    keys_ahead: bool = False  # whether the nodes' keys came with the previous masked inputs
    shares_ahead: bool = False  # and their shares with the previous unmask answers


def model_length(arrays: ArrayRecord, cfg: RunConfig) -> Upcoming:
    """What a training round of ``cfg`` sums: the model's parameters (and, in a distributed-DP
    round, the noisy count after them, all exact integers)."""
    length = sum(a.numpy().size for a in arrays.values())
    distributed = cfg.dp_mode == "distributed"
    return Upcoming(length + int(distributed), integers=distributed)


class SecureAggregation(Stages):
    """Runs the stages for the nodes ``configure_train`` chose, with ``grid`` as transport.
    ``chain`` carries keys advertised ahead from one of the run's aggregations to the next."""

    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        roster: Mapping[int, str] | None = None,
        chain: KeyChain | None = None,
    ) -> None:
        super().__init__(cfg, grid, roster)
        self.chain = chain if chain is not None else KeyChain()

    def parameters(self, n: int) -> SecAggParameters:
        """Degree and threshold from the run's threat model."""
        try:
            return choose(
                n,
                collusion=self.cfg.secagg_collusion,
                dropout=self.cfg.secagg_dropout,
                security_bits=self.cfg.secagg_security_bits,
            )
        except SecAggError as exc:
            raise ConfigError(f"secure aggregation: {exc}") from None

    def _setup(self, flower_ids: Sequence[int], upcoming: Upcoming) -> RoundSetup:
        """The setup of a round of ``flower_ids`` (protocol ids 1..n in this order). When every
        node is registered under a name (a deployment), the setup names them: the nodes then
        sign their keys, check each other's against the roster they pinned, and confirm the
        survivor sets before unmasking."""
        n = len(flower_ids)
        params = self.parameters(n)
        names = [self.roster.get(fid, "") for fid in flower_ids]
        try:
            return RoundSetup.create(
                list(range(1, n + 1)),
                identities=names if all(names) else (),
                vector_length=upcoming.length,
                degree=params.degree,
                threshold=self.cfg.secagg_threshold or params.threshold,
                frac_bits=0 if upcoming.integers else FRAC_BITS,
                max_abs=INTEGER_MAX_ABS if upcoming.integers else MAX_ABS,
            )
        except SecAggError as exc:
            raise ConfigError(f"secagg-threshold: {exc}") from None

    def run(
        self, messages: Sequence[Message], arrays: ArrayRecord, max_weight: float = math.inf
    ) -> SecureRound:
        """A training round: the new global model is the old plus the survivors' average.

        The coordinator cannot see one node's update, but it can see when the sum is one no
        honest nodes could have made: an average change longer than ``max-update-norm`` (every
        honest node bounds its own), or more total weight than ``max_weight`` a survivor. Such
        a round is discarded (the model stays), not applied.
        """
        first = [
            (
                m.metadata.dst_node_id,
                RecordDict({ARRAYS: m.content[ARRAYS], "config": m.content["config"]}),
            )
            for m in messages
        ]
        done = self._run(first, TRAIN_AND_MASK, model_length(arrays, self.cfg))
        if done.vector is not None:
            delta = done.vector / done.total_weight
            survivors = len(first) - len(done.dropped)
            problem = implausible(
                delta, done.total_weight, survivors, self.cfg.max_update_norm, max_weight
            )
            if problem:
                return replace(done, vector=None, error=problem)
            done = replace(done, arrays=unflatten(flatten(arrays) + delta, arrays), vector=None)
        return done

    def run_distributed(self, messages: Sequence[Message], arrays: ArrayRecord) -> SecureRound:
        """A distributed-DP round: the nodes' integer shares (``fedaiot.privacy.distributed``)
        summed exactly, decoded into the step's noisy gradient; the new global model is the
        old one minus ``learning-rate`` times it. A sum no honest nodes could make (a norm
        past every clipped record plus the noise) is discarded."""
        from fedaiot.privacy.distributed import ShareGeometry, decode_sum, plausible_norm

        first = [
            (m.metadata.dst_node_id, RecordDict({ARRAYS: arrays, "config": m.content["config"]}))
            for m in messages
        ]
        vector = flatten(arrays)
        geometry = ShareGeometry.of(vector.size, self.cfg.max_grad_norm)
        floor = survivor_floor(len(first), self.cfg.secagg_dropout, self._threshold(len(first)))
        upcoming = model_length(arrays, self.cfg)
        done = self._run(first, TRAIN_AND_MASK, upcoming, min_survivors=floor)
        if done.vector is None:
            return done
        gradient, count = decode_sum(done.vector, geometry, self.cfg.sample_rate)
        survivors = len(first) - len(done.dropped)
        bound = plausible_norm(
            geometry,
            count=count,
            count_noise=self.cfg.count_noise,
            nodes=survivors,
            variance=self._share_variance(geometry),
        )
        norm = float(np.linalg.norm(done.vector[:-1]))
        if not norm <= bound:
            problem = (
                f"implausible aggregate: the summed shares' norm is {norm:.4g}, more than the "
                f"{bound:.4g} honest nodes' clipped gradients and noise can reach; the round is "
                "discarded"
            )
            return replace(done, vector=None, error=problem)
        stepped = vector - self.cfg.learning_rate * gradient
        return replace(done, arrays=unflatten(stepped, arrays), vector=None, total_weight=count)

    def _threshold(self, n: int) -> int:
        return self.cfg.secagg_threshold or self.parameters(n).threshold

    def _share_variance(self, geometry: Any) -> float:
        from fedaiot.privacy.distributed import plan_sigma, releases_before_training

        sigma = plan_sigma(
            epsilon=self.cfg.epsilon,
            delta=self.cfg.delta,
            sample_rate=self.cfg.sample_rate,
            rounds=self.cfg.planned_rounds,
            geometry=geometry,
            before=releases_before_training(self.cfg),
        )
        floor = survivor_floor(
            len(self.names), self.cfg.secagg_dropout, int(self.setup_notes["threshold"] or 0)
        )
        honest = max(floor - self.cfg.dp_collusion, 1)
        return float(geometry.share_variance(sigma, honest))

    def sum_vectors(self, node_ids: Sequence[int], content: RecordDict, length: int) -> SecureRound:
        """The sum of a vector each node computes (statistics, evaluation counts): ``vector``
        holds it, ``total_weight`` the number of nodes whose vector it includes."""
        first = [(fid, content) for fid in node_ids]
        return self._run(first, VECTOR_AND_MASK, Upcoming(length, integers=False))

    def _run(
        self,
        first: list[tuple[int, RecordDict]],
        message_type: str,
        upcoming: Upcoming,
        *,
        min_survivors: int = 0,
    ) -> SecureRound:
        """The stages; ``upcoming.integers``: the inputs are exact integers (distributed-DP
        shares), summed without fixed-point scaling; fewer than ``min_survivors`` masked inputs
        and the round stops before unmasking (the nodes would refuse anyway)."""
        flower_ids = [fid for fid, _ in first]
        if len(flower_ids) < MIN_NODES:
            raise ConfigError(
                f"secure aggregation needs at least {MIN_NODES} nodes in a round, "
                f"{len(flower_ids)} were sampled: add nodes or set secure-aggregation=false"
            )
        ahead = self.chain.take(flower_ids, upcoming.length, upcoming.integers)
        if ahead is not None:
            ids, setup = ahead.ids, ahead.setup
        else:
            ids = {fid: index + 1 for index, fid in enumerate(flower_ids)}  # protocol ids 1..n
            setup = self._setup(flower_ids, upcoming)
        self.flower_of = {i: fid for fid, i in ids.items()}
        self.names = {
            i: self.roster.get(fid) or self.chain.names.get(fid) or f"node {fid}"
            for fid, i in ids.items()
        }
        self.setup_notes = {**self.parameters(len(ids)).to_dict(), "threshold": setup.threshold}
        server = SecAggServer(setup)
        replies: list[ReceivedReply] = []
        self.laps, self.problems = {}, {}
        if ahead is not None:  # why a node made no keys or shares for this round, back then
            self.problems.update({ids[fid]: why for fid, why in ahead.problems.items()})
        self.restart_clock()
        try:
            adverts = ahead.adverts if ahead is not None else self.advertise(ids, setup)
            if ahead is None:
                self._lap("advertise")
            keys = server.collect_adverts(adverts)
            bundles = ahead.bundles if ahead is not None else None
            shared_ahead = bundles is not None
            if bundles is None:
                bundles = self.exchange(SHARE_KEYS, keys, ShareBundle, setup)
            forwarded = server.collect_shares(bundles)
            if not shared_ahead:
                self._lap("share")
            following = self.following(flower_ids)
            masked = self.compute_and_mask(
                first, message_type, forwarded, setup, replies, following
            )
            server.collect_masked(masked)
            self._lap("train" if message_type == TRAIN_AND_MASK else "compute")
            if len(masked) < min_survivors:
                raise SecAggError(
                    f"distributed DP: {len(masked)} of {len(first)} nodes sent a masked input; "
                    f"their noise shares were sized for a sum of at least {min_survivors}, so "
                    "the round is not unmasked"
                )
            if server.authenticated:  # the survivor sets confirmed before any unmasking
                requests = server.confirm_request()
                confirmations = self.exchange(CONFIRM, requests, Confirmation, setup)
                server.collect_confirmations(confirmations)
                self._lap("confirm")
            next_keys = self.keys_ahead(following)
            shares = self.unmask_and_prepare(server.unmask_request(), setup, next_keys)
            weighted_sum, total = server.aggregate(shares)
            self._lap("unmask")
        except SecAggError as exc:
            return self._result(server, replies, ahead, error=str(exc))
        result = self._result(server, replies, ahead, total=total)
        return replace(result, vector=weighted_sum)

    def _result(
        self,
        server: SecAggServer,
        replies: list[ReceivedReply],
        ahead: Prepared | None,
        *,
        total: float = math.nan,
        error: str = "",
    ) -> SecureRound:
        reasons = {**server.excluded, **self.problems}
        return SecureRound(
            None,
            replies,
            total,
            error=error,
            dropped={self.names[i]: why for i, why in reasons.items()},
            seconds=self.laps,
            parameters=self.setup_notes,
            keys_ahead=ahead is not None,
            shares_ahead=ahead is not None and ahead.bundles is not None,
        )


def implausible(
    delta: np.ndarray, total_weight: float, survivors: int, max_norm: float, max_weight: float
) -> str:
    """Why an unmasked sum cannot have come from honest nodes, or ""."""
    norm = float(np.linalg.norm(delta))
    if not math.isfinite(norm) or norm > max_norm * (1 + 1e-3) + 1e-4:
        return (
            f"implausible aggregate: the average update's norm is {norm:.4g}, more than the "
            f"max-update-norm {max_norm:g} every honest node keeps to; the round is discarded"
        )
    if total_weight > survivors * max_weight * (1 + 1e-3):
        return (
            f"implausible aggregate: a total weight of {total_weight:.0f} from {survivors} "
            f"nodes, more than the {max_weight:g} one node may carry; the round is discarded"
        )
    return ""


def as_strategy_reply(average: ArrayRecord, total_weight: float, request: Message) -> Message:
    """The securely aggregated average as the single reply a Flower strategy aggregates:
    FedAvg and FedProx return it as is, FedAdam takes its server-side step from it."""
    content = RecordDict(
        {ARRAYS: average, METRICS: MetricRecord({"num-examples": max(total_weight, 1.0)})}
    )
    return Message(content, reply_to=request)
