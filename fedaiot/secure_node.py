"""The node's side of a securely aggregated round, one function per message.

Flower starts a ClientApp afresh for each message, so the round's secrets (key pairs, self-mask
seed, received shares) and the node's update wait between stages in ``Context.state``: memory
or storage on the node itself, never sent. They are deleted when the round ends. What leaves
the node: its privacy accounting (epsilon, delta, noise multiplier, time), public keys,
encrypted shares, the masked vector, and at the end the shares the protocol asks for. Its update
and its number of examples travel only inside the masked vector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedaiot.secagg import (
    ForwardedShares,
    NeighbourKeys,
    RoundSetup,
    SecAggClient,
    SecAggError,
    UnmaskRequest,
)
from fedaiot.secure_wire import flatten, pack, unpack

if TYPE_CHECKING:  # the node module pulls in torch and the tasks: not needed past training
    from fedaiot.node import NodeReply

_SETUP, _CLIENT, _UPDATE = "secagg-setup", "secagg-client", "secagg-update"
# What a node reports in the clear under secure aggregation: accounting, not data statistics.
PUBLIC_METRICS = ("epsilon", "delta", "noise-multiplier", "train-seconds")


def advertise(
    reply: NodeReply, global_arrays: ArrayRecord, setup_record: dict[str, object], context: Context
) -> RecordDict:
    """After local training: keep the update, start the SecAgg round, send the key advert."""
    from fedaiot.messages import METRICS, NODE, reply_content

    if reply.status != "trained" or reply.state is None:
        return reply_content(reply)  # a refusal carries no update and joins no round
    setup = RoundSetup.from_record({k: v for k, v in setup_record.items() if k != "node"})
    client = SecAggClient(int(setup_record["node"]), setup)  # type: ignore[call-overload]
    advert = client.advertise()
    update = flatten(ArrayRecord(reply.state), order=global_arrays) - flatten(global_arrays)
    context.state[_SETUP] = ConfigRecord(setup.to_record())  # type: ignore[arg-type]
    context.state[_CLIENT] = ConfigRecord(client.export_state())  # type: ignore[arg-type]
    context.state[_UPDATE] = ConfigRecord(
        {"update": update.tobytes(), "weight": float(reply.examples)}
    )
    public = {k: v for k, v in reply.metrics.items() if k in PUBLIC_METRICS}
    return pack(
        advert.to_record(),
        **{
            METRICS: MetricRecord(public),  # type: ignore[arg-type]
            NODE: ConfigRecord({"id": reply.node, "status": "trained", "reason": ""}),
        },
    )


def _client(context: Context) -> SecAggClient:
    try:
        setup = RoundSetup.from_record(dict(context.state.config_records[_SETUP]))
        return SecAggClient.restore(setup, dict(context.state.config_records[_CLIENT]))
    except KeyError:
        raise SecAggError("no secure-aggregation round in progress on this node") from None


def _save(context: Context, client: SecAggClient) -> None:
    context.state[_CLIENT] = ConfigRecord(client.export_state())  # type: ignore[arg-type]


def share_keys(content: RecordDict, context: Context) -> RecordDict:
    client = _client(context)
    bundle = client.share_keys(NeighbourKeys.from_record(unpack(content)))
    _save(context, client)
    return pack(bundle.to_record())


def masked_input(content: RecordDict, context: Context) -> RecordDict:
    import numpy as np

    client = _client(context)
    kept = context.state.config_records[_UPDATE]
    update = np.frombuffer(kept["update"], dtype=np.float64)  # type: ignore[arg-type]
    masked = client.masked_input(
        ForwardedShares.from_record(unpack(content)),
        update,
        float(kept["weight"]),  # type: ignore[arg-type]
    )
    _save(context, client)
    del context.state[_UPDATE]  # the update is no longer needed once masked
    return pack(masked.to_record())


def unmask(content: RecordDict, context: Context) -> RecordDict:
    client = _client(context)
    try:
        return pack(client.unmask(UnmaskRequest.from_record(unpack(content))).to_record())
    finally:
        for name in (_SETUP, _CLIENT, _UPDATE):
            if name in context.state:
                del context.state[name]
