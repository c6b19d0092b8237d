"""The institution's ClientApp: train privately on local data; take part in secure aggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedaiot.node.guard import guarded
from fedaiot.secure_rounds import handlers
from fedaiot.secure_rounds.wire import unpack

if TYPE_CHECKING:
    from fedaiot.wire.replies import NodeReply

app = ClientApp()


# Flower starts a fresh ClientApp process for every message of a deployment. Training needs
# torch, Opacus and the tasks (seconds of imports); the three later SecAgg+ stages need none of
# them, so those imports wait until a message asks for training.


def _train(msg: Message, context: Context, *, released_on_return: bool) -> NodeReply:
    from fedaiot.config.run import RunConfig
    from fedaiot.node.deployed import DATA_PATH, NodeSettings, deployed_round
    from fedaiot.node.round import simulated_partition, train_round
    from fedaiot.simulation import faults

    cfg = RunConfig.from_run_config(context.run_config)
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    config = dict(msg.content["config"])
    if DATA_PATH in context.node_config:  # a deployed institution: its own files and ledger
        settings = NodeSettings.from_node_config(context.node_config)
        state = arrays.to_torch_state_dict()
        return deployed_round(cfg, settings, config, state, released_on_return=released_on_return)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    node = f"node-{partition_id}"
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    faults.before_training(cfg, node, server_round)
    reply = train_round(
        cfg,
        node=node,
        data=simulated_partition(cfg, partition_id, num_partitions),
        global_state=arrays.to_torch_state_dict(),
        server_round=server_round,
        run_key=str(config["run-key"]),
        ledger_dir=cfg.output_path / "ledgers",
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        released_on_return=released_on_return,
    )
    faults.after_training(cfg, node, server_round)
    return reply


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    from fedaiot.config.run import RunConfig
    from fedaiot.wire.records import reply_content

    reply = _train(msg, context, released_on_return=True)
    private = RunConfig.from_run_config(context.run_config).private
    return Message(content=reply_content(reply, private=private), reply_to=msg)


@app.train("secagg")
@guarded
def train_and_advertise(msg: Message, context: Context) -> Message:
    from fedaiot.config.run import RunConfig

    handlers.forget_round(context)  # an abandoned round's update must never leave later
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    reply = _train(msg, context, released_on_return=False)
    private = RunConfig.from_run_config(context.run_config).private
    content = handlers.advertise(reply, arrays, unpack(msg.content), context, private=private)
    return Message(content=content, reply_to=msg)


@app.query("secagg_share")
@guarded
def share_keys(msg: Message, context: Context) -> Message:
    return Message(content=handlers.share_keys(msg.content, context), reply_to=msg)


@app.query("secagg_mask")
@guarded
def masked_input(msg: Message, context: Context) -> Message:
    return Message(content=handlers.masked_input(msg.content, context), reply_to=msg)


@app.query("secagg_unmask")
@guarded
def unmask(msg: Message, context: Context) -> Message:
    return Message(content=handlers.unmask(msg.content, context), reply_to=msg)
