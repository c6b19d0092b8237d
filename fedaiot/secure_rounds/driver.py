"""A securely aggregated round, driven from the ServerApp as Flower message exchanges.

The stages of SecAgg+ (see :mod:`fedaiot.secagg`) run as four exchanges with the sampled
nodes. First the nodes train and advertise their keys, then they share keys, send masked
inputs and answer the unmask request. The coordinator learns the weighted sum of the surviving
nodes' updates and their total weight, nothing about any one node's update or example count. A
node that drops out at any stage is left out by the protocol. A round with fewer survivors than
the threshold fails cleanly, and the caller keeps the previous global model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.secagg import (
    Confirmation,
    KeyAdvert,
    MaskedInput,
    RoundSetup,
    SecAggError,
    SecAggParameters,
    SecAggServer,
    ShareBundle,
    UnmaskShares,
    choose,
)
from fedaiot.secure_rounds.wire import (
    CONFIRM,
    MASKED_INPUT,
    SECAGG,
    SHARE_KEYS,
    TRAIN_AND_ADVERTISE,
    UNMASK,
    VECTOR_AND_ADVERTISE,
    flatten,
    pack,
    survivor_floor,
    unflatten,
    unpack,
)
from fedaiot.wire.records import ARRAYS, METRICS, ReceivedReply, read_reply, refuse_duplicates
from fedaiot.wire.replies import CONTRIBUTED, FAILED, TRAINED

# Fixed point with 24 fractional bits in Z_2^64: each node's weighted update is exact to 3e-8;
# |update x examples| up to 1e8 per coordinate leaves room for 5,000 nodes without wrapping.
FRAC_BITS, MAX_ABS = 24, 1e8
INTEGER_MAX_ABS = 2.0**52  # a distributed-DP share: exact in float64; 2^10 of them fit Z_2^64
MIN_NODES = 3

M = TypeVar("M", KeyAdvert, ShareBundle, MaskedInput, Confirmation, UnmaskShares)


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


class SecureAggregation:
    """Runs the stages for the nodes ``configure_train`` chose, with ``grid`` as transport."""

    def __init__(self, cfg: RunConfig, grid: Grid, roster: Mapping[int, str] | None = None) -> None:
        self.cfg, self.grid, self.roster = cfg, grid, roster or {}

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
        length = sum(a.numpy().size for a in arrays.values())
        done = self._run(first, TRAIN_AND_ADVERTISE, length)
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
        done = self._run(
            first, TRAIN_AND_ADVERTISE, vector.size + 1, integers=True, min_survivors=floor
        )
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
            rounds=self.cfg.num_rounds,
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
        return self._run([(fid, content) for fid in node_ids], VECTOR_AND_ADVERTISE, length)

    def _run(
        self,
        first: list[tuple[int, RecordDict]],
        message_type: str,
        length: int,
        *,
        integers: bool = False,
        min_survivors: int = 0,
    ) -> SecureRound:
        """The four stages; ``integers``: the inputs are exact integers (distributed-DP
        shares), summed without fixed-point scaling; fewer than ``min_survivors`` masked inputs
        and the round stops before unmasking (the nodes would refuse anyway)."""
        flower_ids = [fid for fid, _ in first]
        if len(flower_ids) < MIN_NODES:
            raise ConfigError(
                f"secure aggregation needs at least {MIN_NODES} nodes in a round, "
                f"{len(flower_ids)} were sampled: add nodes or set secure-aggregation=false"
            )
        ids = {fid: index + 1 for index, fid in enumerate(flower_ids)}  # protocol ids: 1..n
        self.flower_of = {i: fid for fid, i in ids.items()}
        self.names = {i: self.roster.get(fid, f"node {fid}") for fid, i in ids.items()}
        params = self.parameters(len(ids))
        # Every node registered under a name: the nodes check each other's signed keys and
        # confirm the survivor sets against the roster they pinned (a deployment).
        names = [self.roster.get(fid, "") for fid in flower_ids]
        try:
            setup = RoundSetup.create(
                list(ids.values()),
                identities=names if all(names) else (),
                vector_length=length,
                degree=params.degree,
                threshold=self.cfg.secagg_threshold or params.threshold,
                frac_bits=0 if integers else FRAC_BITS,
                max_abs=INTEGER_MAX_ABS if integers else MAX_ABS,
            )
        except SecAggError as exc:
            raise ConfigError(f"secagg-threshold: {exc}") from None
        self.setup_notes = {**params.to_dict(), "threshold": setup.threshold}
        server = SecAggServer(setup)
        replies: list[ReceivedReply] = []
        self.laps: dict[str, float] = {}
        self.problems: dict[int, str] = {}
        self._clock = time.perf_counter()
        try:
            adverts = self._advertise(first, message_type, ids, setup, replies)
            self._lap("train" if message_type == TRAIN_AND_ADVERTISE else "compute")
            keys = server.collect_adverts(adverts)
            bundles = self._exchange(SHARE_KEYS, keys, ShareBundle, setup)
            forwarded = server.collect_shares(bundles)
            self._lap("share")
            masked = self._exchange(MASKED_INPUT, forwarded, MaskedInput, setup)
            server.collect_masked(masked)
            self._lap("mask")
            if len(masked) < min_survivors:
                raise SecAggError(
                    f"distributed DP: {len(masked)} of {len(first)} nodes sent a masked input; "
                    f"their noise shares were sized for a sum of at least {min_survivors}, so "
                    "the round is not unmasked"
                )
            if server.authenticated:
                requests = server.confirm_request()
                server.collect_confirmations(self._exchange(CONFIRM, requests, Confirmation, setup))
                self._lap("confirm")
            shares = self._exchange(UNMASK, server.unmask_request(), UnmaskShares, setup)
            weighted_sum, total = server.aggregate(shares)
            self._lap("unmask")
        except SecAggError as exc:
            return SecureRound(
                None,
                replies,
                error=str(exc),
                dropped=self._dropped(server),
                seconds=self.laps,
                parameters=self.setup_notes,
            )
        return SecureRound(
            None,
            replies,
            total,
            dropped=self._dropped(server),
            seconds=self.laps,
            parameters=self.setup_notes,
            vector=weighted_sum,
        )

    def _lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._clock
        self._clock = now

    def _dropped(self, server: SecAggServer) -> dict[str, str]:
        reasons = {**server.excluded, **self.problems}
        return {self.names[i]: why for i, why in reasons.items()}

    def _advertise(
        self,
        first: list[tuple[int, RecordDict]],
        message_type: str,
        ids: dict[int, int],
        setup: RoundSetup,
        replies: list[ReceivedReply],
    ) -> list[KeyAdvert]:
        """Stage 1: each node computes its input (trains, or computes a vector) and sends its
        key advertisement; the replies that advertise are the round's participants."""
        outgoing = []
        for fid, base in first:
            content = RecordDict(dict(base.items()))
            setup_record = {**setup.to_record(), "node": ids[fid]}
            content[SECAGG] = ConfigRecord(setup_record)  # type: ignore[arg-type]
            outgoing.append(Message(content, dst_node_id=fid, message_type=message_type))
        adverts = []
        raw = list(self.grid.send_and_receive(outgoing, timeout=self.cfg.round_timeout))
        received = [replace(read_reply(m, self.roster), message=None) for m in raw]
        for message, reply in zip(raw, refuse_duplicates(received), strict=True):
            fid = message.metadata.src_node_id
            if fid in ids:
                self.names[ids[fid]] = reply.node
            if reply.status in (TRAINED, CONTRIBUTED):
                advert = self._parse(message, KeyAdvert, setup, ids)
                if advert is None:
                    problem = self.problems.get(ids.get(fid, -1), "")
                    reply = replace(reply, status="rejected", problem=problem)
                else:
                    adverts.append(advert)
            elif fid in ids and reply.problem:
                self.problems[ids[fid]] = reply.problem
            replies.append(reply)
        return adverts

    def _exchange(
        self, message_type: str, outbox: dict[int, Any], kind: type[M], setup: RoundSetup
    ) -> list[M]:
        """Send each node its message of this stage; the replies that parse and match."""
        outgoing = [
            Message(pack(msg.to_record()), dst_node_id=self.flower_of[i], message_type=message_type)
            for i, msg in outbox.items()
        ]
        ids = {fid: i for i, fid in self.flower_of.items()}
        parsed = (
            self._parse(reply, kind, setup, ids)
            for reply in self.grid.send_and_receive(outgoing, timeout=self.cfg.secagg_timeout)
        )
        return [p for p in parsed if p is not None]

    def _parse(
        self, reply: Message, kind: type[M], setup: RoundSetup, ids: dict[int, int]
    ) -> M | None:
        """A reply as a protocol message, or None when the node is to be treated as dropped:
        an error, a malformed record, a message of another round (a replay) or one claiming
        another node's id. The reason is kept in ``self.problems``."""
        sender = ids.get(reply.metadata.src_node_id)
        if sender is None:
            return None
        what = kind.__name__
        if reply.has_error():
            self.problems[sender] = f"{what}: the node's app raised an error"
            return None
        failed = read_reply(reply)
        if failed.status == FAILED:  # a guarded node: a reason code, never its error text
            self.problems[sender] = f"{what}: the node failed ({failed.problem})"
            return None
        try:
            parsed = kind.from_record(unpack(reply.content))
        except (SecAggError, KeyError) as exc:
            self.problems[sender] = f"rejected {what}: {exc}"
            return None
        if parsed.round_id != setup.round_id:
            self.problems[sender] = (
                f"rejected {what}: round id {parsed.round_id} is not this round's "
                f"{setup.round_id} (a replayed message?)"
            )
            return None
        if parsed.node_id != sender:
            self.problems[sender] = f"rejected {what}: claims to come from node {parsed.node_id}"
            return None
        if isinstance(parsed, MaskedInput) and parsed.vector.shape != (setup.masked_length,):
            self.problems[sender] = (
                f"rejected {what}: vector of {parsed.vector.size} values, the round expects "
                f"{setup.masked_length}"
            )
            return None
        return parsed


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
