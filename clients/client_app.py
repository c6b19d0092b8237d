"""The institution's ClientApp: train privately on local data; take part in secure aggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedaiot.node.guard import guarded
from fedaiot.node.memory import returns_freed_heap
from fedaiot.secure_rounds import handlers
from fedaiot.secure_rounds.wire import pack, survivor_floor, unpack
from fedaiot.wire.packing import packed_messages

if TYPE_CHECKING:
    from fedaiot.config.run import RunConfig
    from fedaiot.wire.replies import NodeReply

# Contents come packed from a coordinator that packs them, and go back so (fewer requests).
app = ClientApp(mods=[packed_messages])


# Under Flower's own SuperExec a fresh ClientApp process starts for every message. Training
# needs torch, Opacus and the tasks (seconds of imports); the key stages need none of them, so
# those imports wait until a message asks for training or a release. (The kit's runner has
# imported them all before the first message: fedaiot.launch.clientapp_runner.)
# In a simulation one Ray worker serves many nodes for the whole run: every handler hands the
# heap it freed back to the system when it ends (fedaiot.node.memory says why).


def _config(context: Context) -> RunConfig:
    from fedaiot.config.run import RunConfig

    return RunConfig.from_run_config(context.run_config)


def _train(
    msg: Message, context: Context, *, released_on_return: bool, survivors: int | None = None
) -> NodeReply:
    from fedaiot.node import requests
    from fedaiot.simulation import faults

    cfg = _config(context)
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    config = dict(msg.content["config"])
    simulated = "partition-id" in context.node_config
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    node = f"node-{context.node_config.get('partition-id')}"
    if simulated:
        faults.before_training(cfg, node, server_round)
    state = arrays.to_torch_state_dict()
    reply = requests.train(
        cfg,
        context.node_config,
        config,
        state,
        released_on_return=released_on_return,
        survivors=survivors,
    )
    if simulated:
        faults.after_training(cfg, node, server_round)
    return reply


def _release(msg: Message, context: Context) -> NodeReply:
    from fedaiot.node import requests

    arrays = msg.content.array_records.get("arrays")
    state = arrays.to_torch_state_dict() if arrays is not None else None
    return requests.release(
        _config(context), context.node_config, dict(msg.content["config"]), state
    )


@app.train()
@returns_freed_heap
@guarded
def train(msg: Message, context: Context) -> Message:
    from fedaiot.wire.records import reply_content

    reply = _train(msg, context, released_on_return=True)
    return Message(content=reply_content(reply, private=_config(context).private), reply_to=msg)


@app.query("vector")
@returns_freed_heap
@guarded
def vector(msg: Message, context: Context) -> Message:
    from fedaiot.wire.records import reply_content

    reply = _release(msg, context)
    return Message(content=reply_content(reply, private=_config(context).private), reply_to=msg)


@app.query("secagg_advertise")
@returns_freed_heap
@guarded
def advertise(msg: Message, context: Context) -> Message:
    from flwr.app import ConfigRecord

    advert = handlers.advertise(unpack(msg.content), context)
    # a simulated node names its partition; a deployed one nothing (its key names it)
    partition = context.node_config.get("partition-id")
    name = f"node-{partition}" if partition is not None else ""
    node = ConfigRecord({"id": name, "status": "advertised", "reason": ""})
    return Message(content=pack(advert, node=node), reply_to=msg)


@app.query("secagg_share")
@returns_freed_heap
@guarded
def share_keys(msg: Message, context: Context) -> Message:
    return Message(content=handlers.share_keys(msg.content, context), reply_to=msg)


@app.train("secagg")
@returns_freed_heap
@guarded
def train_and_mask(msg: Message, context: Context) -> Message:
    client, forwarded = handlers.ready_to_mask(msg.content, context)  # before any charge
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    cfg = _config(context)
    # A distributed-DP noise share is sized for the fewest survivors this node will let the
    # round unmask (it checks that itself at the unmask stage), never a number merely claimed.
    setup = client.setup
    floor = survivor_floor(len(setup.node_ids), cfg.secagg_dropout, setup.threshold)
    reply = _train(msg, context, released_on_return=False, survivors=floor)
    floor = floor if cfg.dp_mode == "distributed" else 0
    content = handlers.mask(
        reply, arrays, client, forwarded, context, private=cfg.private, min_survivors=floor
    )
    return Message(content=handlers.with_keys_ahead(msg.content, content, context), reply_to=msg)


@app.query("secagg_vector")
@returns_freed_heap
@guarded
def vector_and_mask(msg: Message, context: Context) -> Message:
    client, forwarded = handlers.ready_to_mask(msg.content, context)
    reply = _release(msg, context)
    private = _config(context).private
    content = handlers.mask(reply, None, client, forwarded, context, private=private)
    return Message(content=handlers.with_keys_ahead(msg.content, content, context), reply_to=msg)


@app.query("secagg_confirm")
@returns_freed_heap
@guarded
def confirm(msg: Message, context: Context) -> Message:
    return Message(content=handlers.confirm(msg.content, context), reply_to=msg)


@app.query("secagg_unmask")
@returns_freed_heap
@guarded
def unmask(msg: Message, context: Context) -> Message:
    return Message(content=handlers.unmask(msg.content, context), reply_to=msg)
