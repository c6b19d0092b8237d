"""The message exchanges of one secure round, as the coordinator runs them over a Flower Grid.

Each method is one exchange: messages out to the round's nodes, replies back, each reply parsed
as the protocol message it must be. A reply that is an error, malformed, of another round (a
replay) or claims another node's id makes that node a dropout, with the reason kept in
``problems``. :class:`fedaiot.secure_rounds.driver.SecureAggregation` puts them in order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedaiot.config.run import RunConfig
from fedaiot.secagg import (
    Confirmation,
    ForwardedShares,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    RoundSetup,
    SecAggError,
    SecAggServer,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)
from fedaiot.secure_rounds.keys import KeyChain, Prepared, Upcoming
from fedaiot.secure_rounds.wire import ADVERTISE, NEXT, SECAGG, SHARE_KEYS, UNMASK, pack, unpack
from fedaiot.wire.packing import unreadable
from fedaiot.wire.records import NODE, ReceivedReply, identity, read_reply, refuse_duplicates
from fedaiot.wire.replies import CONTRIBUTED, FAILED, TRAINED

M = TypeVar("M", KeyAdvert, ShareBundle, MaskedInput, Confirmation, UnmaskShares)
A = TypeVar("A", KeyAdvert, ShareBundle)  # what comes ahead for the next round


class Stages:
    """The exchanges; ``flower_of`` maps the round's protocol ids to Flower node ids."""

    def __init__(self, cfg: RunConfig, grid: Grid, roster: Mapping[int, str] | None) -> None:
        self.cfg, self.grid, self.roster = cfg, grid, roster or {}
        self.chain = KeyChain()
        self.flower_of: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.problems: dict[int, str] = {}
        self.laps: dict[str, float] = {}
        self._clock = time.perf_counter()

    def restart_clock(self) -> None:
        self._clock = time.perf_counter()

    def _lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._clock
        self._clock = now

    def _setup(self, flower_ids: Sequence[int], upcoming: Upcoming) -> RoundSetup:
        raise NotImplementedError  # the driver knows the threat model and the fixed point

    def advertise(self, ids: dict[int, int], setup: RoundSetup) -> list[KeyAdvert]:
        """Every node of the round makes fresh keys for ``setup`` and advertises them."""
        outgoing = [
            Message(pack({**setup.to_record(), "node": i}), dst_node_id=fid, message_type=ADVERTISE)
            for fid, i in ids.items()
        ]
        replies = list(self.grid.send_and_receive(outgoing, timeout=self.cfg.secagg_timeout))
        for reply in replies:
            self._learn_name(reply)
        parsed = (self._parse(r, KeyAdvert, setup, ids) for r in replies)
        return [p for p in parsed if p is not None]

    def _learn_name(self, reply: Message) -> None:
        """What a node calls itself, from any reply that says (the roster's name wins)."""
        claimed = _claimed(reply)
        if not claimed and not self.roster:
            return  # a failure reply names no one: keep what the node said before
        source = reply.metadata.src_node_id
        self.chain.names[source] = identity(reply, claimed, self.roster)
        protocol_id = {fid: i for i, fid in self.flower_of.items()}.get(source)
        if protocol_id is not None:
            self.names[protocol_id] = self.chain.names[source]

    def exchange(
        self, message_type: str, outbox: dict[int, Any], kind: type[M], setup: RoundSetup
    ) -> list[M]:
        """Send each node its message of this stage; the replies that parse and match."""
        outgoing = [
            Message(pack(msg.to_record()), dst_node_id=self.flower_of[i], message_type=message_type)
            for i, msg in outbox.items()
        ]
        ids = {fid: i for i, fid in self.flower_of.items()}
        replies = self.grid.send_and_receive(outgoing, timeout=self.cfg.secagg_timeout)
        parsed = (self._parse(reply, kind, setup, ids) for reply in replies)
        return [p for p in parsed if p is not None]

    def following(self, nodes: Sequence[int]) -> Prepared | None:
        """The setup of the run's next aggregation, over ``nodes`` (None when none follows):
        its keys and shares ride on this round's messages."""
        upcoming = self.chain.upcoming
        if upcoming is None:
            return None
        ids = {fid: index + 1 for index, fid in enumerate(nodes)}
        return Prepared(self._setup(nodes, upcoming), ids, upcoming.integers)

    def compute_and_mask(
        self,
        first: list[tuple[int, RecordDict]],
        message_type: str,
        forwarded: dict[int, ForwardedShares],
        setup: RoundSetup,
        replies: list[ReceivedReply],
        following: Prepared | None = None,
    ) -> list[MaskedInput]:
        """Each node that shared its keys gets its request (the global model and the round's
        config, or a release's) with the shares addressed to it; it computes its input (trains)
        and sends it masked in the same reply. Every reply is journalled in ``replies``; the
        masked inputs that parse are the round's survivors. With a ``following`` round, each
        request names its setup and each node advertises its keys for it in the reply (a node
        left out of this round gets an advertising message instead)."""
        ids = {fid: i for i, fid in self.flower_of.items()}
        outgoing = []
        for fid, base in first:
            protocol_id = ids[fid]
            if protocol_id not in forwarded:
                # left out before this stage: it never computes, it is never charged
                if following is not None:
                    outgoing.append(_advertising(following, fid))
                continue
            content = pack(forwarded[protocol_id].to_record(), **dict(base.items()))
            if following is not None:
                content[NEXT] = _setup_record(following, fid)
            outgoing.append(Message(content, dst_node_id=fid, message_type=message_type))
        timeout = self.cfg.round_timeout
        raw = list(self.grid.send_and_receive(outgoing, timeout=timeout))
        if following is not None:
            for advertised in raw:
                if advertised.metadata.message_type == ADVERTISE:
                    self._learn_name(advertised)
            following.adverts.extend(self._ahead(raw, following, KeyAdvert))
            self.chain.prepared = following
        computed = [m for m in raw if m.metadata.message_type == message_type]
        received = [replace(read_reply(m, self.roster), message=None) for m in computed]
        masked = []
        for message, reply in zip(computed, refuse_duplicates(received), strict=True):
            sender = ids.get(message.metadata.src_node_id)
            if sender is not None:
                self.names[sender] = reply.node
            if reply.status in (TRAINED, CONTRIBUTED):
                # a masked input that does not parse leaves the node out of the sum; it did
                # compute (and spend), so its status stays and the loop records it as dropped
                parsed = self._parse(message, MaskedInput, setup, ids)
                if parsed is not None:
                    masked.append(parsed)
            elif sender is not None and reply.problem:
                self.problems[sender] = reply.problem
            replies.append(reply)
        return masked

    def keys_ahead(self, following: Prepared | None) -> dict[int, NeighbourKeys]:
        """The next round's neighbour keys for each of its nodes (by protocol id of that round),
        to send with this round's unmask requests. Only when every node of the next round
        advertised: a node that did not (it failed this round, its reply was lost) gets an
        advertising message in the unmask exchange instead, and the next round shares its keys
        in an exchange of its own, so a node's failure costs the next round an exchange, not
        the node its place in it."""
        if following is None or len(following.adverts) < len(following.ids):
            return {}
        try:
            return SecAggServer(following.setup).collect_adverts(following.adverts)
        except SecAggError:
            return {}

    def unmask_and_prepare(
        self,
        requests: dict[int, UnmaskRequest],
        setup: RoundSetup,
        ahead: dict[int, NeighbourKeys] | None = None,
    ) -> list[UnmaskShares]:
        """Ask the survivors for their shares. With the next round's neighbour keys
        (``ahead``, from :meth:`keys_ahead`), the same exchange shares that round's keys:
        survivors answer with their shares for it too, the next round's other nodes get a
        sharing message of their own. Without them, the next round's nodes that have not
        advertised get an advertising message."""
        ids = {fid: i for i, fid in self.flower_of.items()}
        following = self.chain.prepared
        protocol_of = following.ids if following is not None else {}
        outgoing = []
        for i, request in requests.items():
            content = pack(request.to_record())
            keys = ahead.get(protocol_of.get(self.flower_of[i], 0)) if ahead else None
            if keys is not None:
                content[NEXT] = ConfigRecord(keys.to_record())  # type: ignore[arg-type]
            outgoing.append(Message(content, dst_node_id=self.flower_of[i], message_type=UNMASK))
        if following is not None and ahead:
            asked = {self.flower_of[i] for i in requests}
            for fid, protocol_id in following.ids.items():
                if fid not in asked and protocol_id in ahead:
                    content = pack(ahead[protocol_id].to_record())
                    outgoing.append(Message(content, dst_node_id=fid, message_type=SHARE_KEYS))
        elif following is not None:
            advertised = {a.node_id for a in following.adverts}
            for fid, protocol_id in following.ids.items():
                if protocol_id not in advertised:
                    outgoing.append(_advertising(following, fid))
        replies = list(self.grid.send_and_receive(outgoing, timeout=self.cfg.secagg_timeout))
        shares = []
        for reply in replies:
            self._learn_name(reply)
            if reply.metadata.message_type == UNMASK:
                parsed = self._parse(reply, UnmaskShares, setup, ids)
                if parsed is not None:
                    shares.append(parsed)
        if following is not None and ahead:  # only from nodes that were sent keys to share
            bundles = self._ahead(replies, following, ShareBundle)
            following.bundles = [b for b in bundles if b.node_id in ahead]
        elif following is not None:
            following.adverts.extend(self._ahead(replies, following, KeyAdvert))
        return shares

    def _ahead(self, replies: Sequence[Message], following: Prepared, kind: type[A]) -> list[A]:
        """The next round's adverts or share bundles among ``replies``, each from the node it
        names and of that round. A node whose part is missing, malformed or refused joins that
        round as a dropout, with the reason kept for that round's journal."""
        found = []
        for reply in replies:
            source = reply.metadata.src_node_id
            if reply.has_error() or source not in following.ids:
                continue
            record, failed = _ahead_record(reply)
            what = kind.__name__
            if failed:
                following.problems[source] = f"{what}: the node failed ({failed})"
                continue
            if not record:
                continue  # the reply's own failure is this round's, journalled with it
            try:
                parsed = kind.from_record(record)
            except (SecAggError, KeyError) as exc:
                following.problems[source] = f"rejected {what}: {exc}"
                continue
            if (parsed.round_id, parsed.node_id) != (
                following.setup.round_id,
                following.ids[source],
            ):
                following.problems[source] = f"rejected {what}: not this node's for the round"
                continue
            found.append(parsed)
        return found

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
        why = unreadable(reply.content)
        if why:
            self.problems[sender] = f"rejected {what}: {why}"
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


def _claimed(reply: Message) -> str:
    """The name a reply's node record gives ("" for none, or for an error)."""
    if reply.has_error() or NODE not in reply.content.config_records:
        return ""
    return str(reply.content.config_records[NODE].get("id", ""))


def _ahead_record(reply: Message) -> tuple[dict[str, Any], str]:
    """The next round's part of a reply (in a message of its own, or riding on this round's
    reply), or the reason code the node gave for making none."""
    records = reply.content.config_records
    if reply.metadata.message_type in (ADVERTISE, SHARE_KEYS):
        own = read_reply(reply)
        if own.status == FAILED:
            return {}, own.problem
        return (dict(records[SECAGG]) if SECAGG in records else {}), ""
    record = dict(records[NEXT]) if NEXT in records else {}
    return record, str(record.get("failed", ""))


def _setup_record(following: Prepared, fid: int) -> ConfigRecord:
    """The next round's setup as node ``fid`` gets it: with its protocol id in that round."""
    record: dict[str, Any] = {**following.setup.to_record(), "node": following.ids[fid]}
    return ConfigRecord(record)


def _advertising(following: Prepared, fid: int) -> Message:
    """A message asking node ``fid`` for its keys for the next round, on their own."""
    record = {**following.setup.to_record(), "node": following.ids[fid]}
    return Message(pack(record), dst_node_id=fid, message_type=ADVERTISE)
