"""The institution's ClientApp: decode the round, train privately on local data, reply."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedaiot.config import RunConfig
from fedaiot.messages import reply_content
from fedaiot.node import simulated_partition, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    node = f"node-{partition_id}"
    config = msg.content["config"]
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    reply = train_round(
        cfg,
        node=node,
        data=simulated_partition(cfg, partition_id, num_partitions),
        global_state=arrays.to_torch_state_dict(),
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        run_key=str(config["run-key"]),
        ledger_path=cfg.output_path / "ledgers" / f"{node}.json",
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
    )
    return Message(content=reply_content(reply), reply_to=msg)
