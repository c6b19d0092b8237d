"""The institution's ClientApp: train privately on local data; take part in secure aggregation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedaiot import secure_node
from fedaiot.secure_wire import unpack

if TYPE_CHECKING:
    from fedaiot.node import NodeReply

app = ClientApp()


# Flower starts a fresh ClientApp process for every message of a deployment. Training needs
# torch, Opacus and the tasks (seconds of imports); the three later SecAgg+ stages need none of
# them, so those imports wait until a message asks for training.


def _train(msg: Message, context: Context) -> NodeReply:
    from fedaiot import faults
    from fedaiot.config import RunConfig
    from fedaiot.deploy.node_round import DATA_PATH, NodeSettings, deployed_round
    from fedaiot.node import simulated_partition, train_round

    cfg = RunConfig.from_run_config(context.run_config)
    if DATA_PATH in context.node_config:  # a deployed institution: its own files and ledger
        arrays_in: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        settings = NodeSettings.from_node_config(context.node_config)
        config_in = dict(msg.content["config"])
        return deployed_round(cfg, settings, config_in, arrays_in.to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    node = f"node-{partition_id}"
    config = msg.content["config"]
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    faults.before_training(cfg, node, server_round)
    reply = train_round(
        cfg,
        node=node,
        data=simulated_partition(cfg, partition_id, num_partitions),
        global_state=arrays.to_torch_state_dict(),
        server_round=server_round,
        run_key=str(config["run-key"]),
        ledger_path=cfg.output_path / "ledgers" / f"{node}.json",
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
    )
    faults.after_training(cfg, node, server_round)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedaiot.messages import reply_content

    return Message(content=reply_content(_train(msg, context)), reply_to=msg)


@app.train("secagg")
def train_and_advertise(msg: Message, context: Context) -> Message:
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    content = secure_node.advertise(_train(msg, context), arrays, unpack(msg.content), context)
    return Message(content=content, reply_to=msg)


@app.query("secagg_share")
def share_keys(msg: Message, context: Context) -> Message:
    return Message(content=secure_node.share_keys(msg.content, context), reply_to=msg)


@app.query("secagg_mask")
def masked_input(msg: Message, context: Context) -> Message:
    return Message(content=secure_node.masked_input(msg.content, context), reply_to=msg)


@app.query("secagg_unmask")
def unmask(msg: Message, context: Context) -> Message:
    return Message(content=secure_node.unmask(msg.content, context), reply_to=msg)
