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
    RoundSetup,
    SecAggError,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)
from fedaiot.secure_rounds.keys import KeyChain, Prepared, Upcoming
from fedaiot.secure_rounds.wire import ADVERTISE, NEXT, SECAGG, UNMASK, pack, unpack
from fedaiot.wire.records import NODE, ReceivedReply, identity, read_reply, refuse_duplicates
from fedaiot.wire.replies import CONTRIBUTED, FAILED, TRAINED

M = TypeVar("M", KeyAdvert, ShareBundle, MaskedInput, Confirmation, UnmaskShares)


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

    def compute_and_mask(
        self,
        first: list[tuple[int, RecordDict]],
        message_type: str,
        forwarded: dict[int, ForwardedShares],
        setup: RoundSetup,
        replies: list[ReceivedReply],
    ) -> list[MaskedInput]:
        """Each node that shared its keys gets its request (the global model and the round's
        config, or a release's) with the shares addressed to it; it computes its input (trains)
        and sends it masked in the same reply. Every reply is journalled in ``replies``; the
        masked inputs that parse are the round's survivors."""
        ids = {fid: i for i, fid in self.flower_of.items()}
        outgoing = []
        for fid, base in first:
            protocol_id = ids[fid]
            if protocol_id not in forwarded:
                continue  # left out before this stage: it never computes, it is never charged
            content = pack(forwarded[protocol_id].to_record(), **dict(base.items()))
            outgoing.append(Message(content, dst_node_id=fid, message_type=message_type))
        timeout = self.cfg.round_timeout
        raw = list(self.grid.send_and_receive(outgoing, timeout=timeout))
        received = [replace(read_reply(m, self.roster), message=None) for m in raw]
        masked = []
        for message, reply in zip(raw, refuse_duplicates(received), strict=True):
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

    def unmask_and_prepare(
        self, requests: dict[int, UnmaskRequest], setup: RoundSetup, nodes: list[int]
    ) -> list[UnmaskShares]:
        """Ask the survivors for their shares. When the run has a next aggregation, the same
        exchange carries its setup: survivors advertise their keys for it in the unmask reply,
        the round's other nodes (``nodes``) get an advertising message of their own."""
        upcoming = self.chain.upcoming
        ids = {fid: i for i, fid in self.flower_of.items()}
        following = None
        if upcoming is not None:
            next_ids = {fid: index + 1 for index, fid in enumerate(nodes)}
            following = Prepared(self._setup(nodes, upcoming), next_ids, upcoming.integers)
        outgoing = []
        for i, request in requests.items():
            content = pack(request.to_record())
            if following is not None:
                node = following.ids[self.flower_of[i]]
                record = {**following.setup.to_record(), "node": node}
                content[NEXT] = ConfigRecord(record)  # type: ignore[arg-type]
            outgoing.append(Message(content, dst_node_id=self.flower_of[i], message_type=UNMASK))
        if following is not None:
            asked = {self.flower_of[i] for i in requests}
            for fid in nodes:
                if fid not in asked:
                    record = {**following.setup.to_record(), "node": following.ids[fid]}
                    outgoing.append(Message(pack(record), dst_node_id=fid, message_type=ADVERTISE))
        replies = list(self.grid.send_and_receive(outgoing, timeout=self.cfg.secagg_timeout))
        shares = []
        for reply in replies:
            self._learn_name(reply)
            if reply.metadata.message_type == UNMASK:
                parsed = self._parse(reply, UnmaskShares, setup, ids)
                if parsed is not None:
                    shares.append(parsed)
            if following is not None:
                advert = _next_advert(reply, following)
                if advert is not None:
                    following.adverts.append(advert)
        self.chain.prepared = following
        return shares

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


def _claimed(reply: Message) -> str:
    """The name a reply's node record gives ("" for none, or for an error)."""
    if reply.has_error() or NODE not in reply.content.config_records:
        return ""
    return str(reply.content.config_records[NODE].get("id", ""))


def _next_advert(reply: Message, following: Prepared) -> KeyAdvert | None:
    """The key advert for the next round a reply carries, if it is a valid one from the node
    it came from; a node without one simply joins the next round as a dropout."""
    if reply.has_error():
        return None
    content = reply.content
    name = NEXT if reply.metadata.message_type == UNMASK else SECAGG
    if name not in content.config_records:
        return None
    try:
        advert = KeyAdvert.from_record(dict(content.config_records[name]))
    except (SecAggError, KeyError):
        return None
    expected = following.ids.get(reply.metadata.src_node_id)
    if advert.round_id != following.setup.round_id or advert.node_id != expected:
        return None
    return advert
