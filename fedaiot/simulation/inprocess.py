"""A Flower Grid that delivers messages in-process to the real ClientApp handlers (no Ray).

Each node keeps one Context across messages, as a SuperNode does, so the secure-aggregation
stages find their state. A handler that raises becomes an error reply, as in Flower. The same
coordinator, apps and node code run as under Flower's simulation engine, without Ray's start-up
or message dispatch: tests use it, and so do tuning scripts that need many short runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from clients import client_app
from fedaiot.config.run import RunConfig
from fedaiot.wire.packing import packed_messages

Handler = Callable[[Message, Context], Message | None]
ROUTES: dict[str, Handler] = {
    "train": client_app.train,
    "train.secagg": client_app.train_and_mask,
    "query.vector": client_app.vector,
    "query.secagg_vector": client_app.vector_and_mask,
    "query.secagg_advertise": client_app.advertise,
    "query.secagg_share": client_app.share_keys,
    "query.secagg_confirm": client_app.confirm,
    "query.secagg_unmask": client_app.unmask,
}
FIRST_ID = 100


class InProcessGrid(Grid):
    """``handlers[i]`` overrides node i's handler for a message type; ``None`` drops the reply."""

    def __init__(
        self,
        cfg: RunConfig,
        nodes: int | list[Handler],
        *,
        overrides: dict[tuple[int, str], Handler | None] | None = None,
    ) -> None:
        self.overrides: dict[tuple[int, str], Handler | None] = {}
        if isinstance(nodes, list):  # one train handler per node, for plain rounds
            self.overrides = {(i, "train"): h for i, h in enumerate(nodes)}
            count = len(nodes)
        else:
            count = nodes
        self.overrides.update(overrides or {})
        self.contexts = [
            Context(
                run_id=1,
                node_id=FIRST_ID + i,
                node_config={"partition-id": i, "num-partitions": count},
                state=RecordDict(),
                run_config=cfg.to_run_config(),
            )
            for i in range(count)
        ]

    def get_node_ids(self) -> Iterable[int]:
        return range(FIRST_ID, FIRST_ID + len(self.contexts))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            index = message.metadata.dst_node_id - FIRST_ID
            kind = message.metadata.message_type
            handler = self.overrides.get((index, kind), ROUTES[kind])
            if handler is None:
                continue  # the node dropped out
            try:
                reply = self._deliver(message, index, handler)
                if reply is not None:  # None: the node answered, and the answer was lost
                    replies.append(reply)
            except Exception as exc:
                replies.append(Message(Error(code=1, reason=repr(exc)), reply_to=message))
        return replies

    def _deliver(self, message: Message, index: int, handler: Handler) -> Message | None:
        """The handler's reply, through the ClientApp's mod as Flower calls it (None: lost)."""
        lost = False

        def call(msg: Message, context: Context) -> Message:
            nonlocal lost
            reply = handler(msg, context)
            lost = reply is None
            return reply if reply is not None else Message(RecordDict(), reply_to=msg)

        reply = packed_messages(message, self.contexts[index], call)
        return None if lost else reply

    # the rest of Grid's interface is not used by the coordinator
    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


def run_inprocess(cfg: RunConfig, nodes: int) -> dict[str, object]:
    """Run ``cfg`` over ``nodes`` in-process nodes through the real coordinator; its summary."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedaiot.rounds.loop import RoundLoop

    # Flower messages need a task identity, which a running Flower process would set.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return RoundLoop(cfg).run_rounds(InProcessGrid(cfg, nodes))
