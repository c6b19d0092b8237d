"""The coordinator's message exchanges: counted, and (deployed) waited for without Flower's 3 s.

An *exchange* is one ``send_and_receive``: messages out to a round's nodes, the replies back.
A round's pace is set by how many it takes and how long each waits, so the round loop counts
them (``exchanges`` in every journalled round). Flower's ``HttpGrid.send_and_receive`` looks
for replies every 3 s; :class:`ReplyLoop` looks every ``Polling.results`` seconds through the
Grid's public ``push_messages`` and ``pull_messages``, with the same timeout semantics: the
replies that arrived before the timeout, the rest treated as missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message
from flwr.proto.node_pb2 import NodeInfo
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedaiot.config.polling import Polling
from fedaiot.wire.packing import pack_content, read_packed_reply


class CountingGrid(Grid):
    """``inner`` as it is, with its exchanges and messages counted. With ``pack``, each
    message's content travels as one record each way (``fedaiot.wire.packing``), the global
    model encoded once for every node an exchange; a reply whose packed content cannot be read
    keeps only the reason, for the reply's checks to reject."""

    def __init__(self, inner: Grid, *, pack: bool = False) -> None:
        self.inner = inner
        self.pack = pack
        self.exchanges = 0
        self.messages = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        outgoing = list(messages)
        self.exchanges += 1
        self.messages += len(outgoing)
        if not self.pack:
            return self._exchange(outgoing, timeout)
        done: dict[int, tuple[ArrayRecord, ProtoArrayRecord]] = {}
        for message in outgoing:
            if message.has_content():
                message.content = pack_content(message.content, done)
        replies = list(self._exchange(outgoing, timeout))
        for reply in replies:
            if reply.has_content():
                reply.content = read_packed_reply(reply.content)
        return replies

    def _exchange(self, messages: list[Message], timeout: float | None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)

    # the rest of the Grid, delegated
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: object, **kwargs: object) -> Message:
        return self.inner.create_message(*args, **kwargs)  # type: ignore[arg-type]

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)


class ReplyLoop(CountingGrid):
    """A Flower Grid whose exchanges look for replies every ``polling.results`` seconds, or,
    given ``first``, after ``first`` seconds, then twice as long each time up to
    ``polling.results``: quick replies are seen at once, slow ones cost few looks. Packs
    contents unless told not to (Flower's stock behaviour is the plain CountingGrid)."""

    def __init__(
        self, inner: Grid, polling: Polling, first: float | None = None, *, pack: bool = True
    ) -> None:
        super().__init__(inner, pack=pack)
        self.interval = polling.results
        self.first = self.interval if first is None else min(first, self.interval)

    def _exchange(self, messages: list[Message], timeout: float | None) -> Iterable[Message]:
        waiting = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first
        while waiting:
            arrived = list(self.inner.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(wait)
            wait = min(2 * wait, self.interval)
        return replies


def serverapp_grid(
    grid: Grid, polling: Polling | None = None, *, simulation_poll: float | None = None
) -> CountingGrid:
    """The grid a ServerApp runs its rounds on: Flower's own waits when ``polling`` is stock,
    the reply loop otherwise. In a simulation (Flower's ``InMemoryGrid``, where a look costs
    no request) the loop first looks after ``simulation_poll`` seconds."""
    from flwr.superlink.grid import InMemoryGrid

    polling = polling or Polling.from_env()
    if polling.stock:
        return CountingGrid(grid)
    first = simulation_poll if isinstance(grid, InMemoryGrid) else None
    return ReplyLoop(grid, polling, first=first)
