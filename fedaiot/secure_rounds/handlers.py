"""The node's side of a securely aggregated round, one function per message.

Flower starts a ClientApp afresh for each message, so the round's secrets (key pairs, self-mask
seed, received shares), the node's update and its pending privacy charge wait between stages in
``Context.state``: memory or storage on the node itself, never sent. They are deleted when the
round ends, and before the next round trains. What leaves the node: its privacy accounting
(epsilon, delta, noise multiplier), public keys, encrypted shares, the masked vector, and at
the end the shares the protocol asks for. A deployed node also signs its public keys and the
survivor sets it is shown with its identity key, and checks its neighbours' signatures against
its pinned roster (``identity``). Its update and its weight (the noisy count) travel
only inside the masked vector; the charge is marked released when the masked vector is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedaiot.secagg import (
    ConfirmRequest,
    ForwardedShares,
    NeighbourKeys,
    ProtocolViolation,
    RoundSetup,
    SecAggClient,
    SecAggError,
    UnmaskRequest,
)
from fedaiot.secure_rounds.identity import colluders, node_identity
from fedaiot.secure_rounds.wire import flatten, pack, unpack

if TYPE_CHECKING:  # the node module pulls in torch and the tasks: not needed past training
    from fedaiot.wire.replies import NodeReply

_SETUP, _CLIENT, _UPDATE, _PENDING, _FLOOR = (
    "secagg-setup",
    "secagg-client",
    "secagg-update",
    "secagg-charge",
    "secagg-floor",  # a distributed-DP share's fewest survivors
)


def forget_round(context: Context) -> None:
    """Drop whatever an earlier round left on the node (its update, keys and pending charge).

    Called before training: once a round is forgotten its update can never be masked and
    sent, which is what lets the budget return that round's unreleased charge.
    """
    for name in (_SETUP, _CLIENT, _UPDATE, _PENDING, _FLOOR):
        if name in context.state:
            del context.state[name]


def _setup(setup_record: dict[str, object]) -> RoundSetup:
    return RoundSetup.from_record({k: v for k, v in setup_record.items() if k != "node"})


def new_client(setup_record: dict[str, object], context: Context) -> SecAggClient:
    """This node's side of the round the coordinator set up. Called before training too, so
    that a round this node would refuse (unauthenticated, naming it as another institution,
    naming an institution its roster lacks) costs no budget."""
    setup = _setup(setup_record)
    return SecAggClient(
        int(setup_record["node"]),  # type: ignore[call-overload]
        setup,
        node_identity(context.node_config),
        colluders(context.run_config, len(setup.node_ids)),
    )


def advertise(
    reply: NodeReply,
    global_arrays: ArrayRecord | None,
    setup_record: dict[str, object],
    context: Context,
    *,
    private: bool,
    min_survivors: int = 0,
) -> RecordDict:
    """After local training (or computing a release's vector): keep the input, start the
    SecAgg round, send the key advert. A trained update is masked as its difference from
    ``global_arrays``; a vector as it is, with weight 1."""
    import numpy as np

    from fedaiot.wire.records import METRICS, NODE, reply_content, wire_mode
    from fedaiot.wire.replies import CONTRIBUTED, TRAINED, clear_metrics

    if reply.status in (CONTRIBUTED, TRAINED) and reply.vector is not None:
        # a release's vector, or a distributed-DP round's noisy integer share
        update, weight = np.asarray(reply.vector, dtype=np.float64), 1.0
    elif reply.status == TRAINED and reply.state is not None and global_arrays is not None:
        update = flatten(ArrayRecord(reply.state), order=global_arrays) - flatten(global_arrays)
        weight = reply.weight
    else:
        return reply_content(reply, private=private, secure=True)  # joins no round
    client = new_client(setup_record, context)
    setup = client.setup
    advert = client.advertise()
    context.state[_SETUP] = ConfigRecord(setup.to_record())  # type: ignore[arg-type]
    context.state[_CLIENT] = ConfigRecord(client.export_state())  # type: ignore[arg-type]
    context.state[_UPDATE] = ConfigRecord({"update": update.tobytes(), "weight": weight})
    context.state[_FLOOR] = ConfigRecord({"min-survivors": min_survivors})
    if reply.pending is not None:
        context.state[_PENDING] = ConfigRecord(reply.pending.to_record())  # type: ignore[arg-type]
    mode = wire_mode(reply.status, private=private, secure=True)
    return pack(
        advert.to_record(),
        **{
            METRICS: MetricRecord(clear_metrics(mode, reply.metrics)),  # type: ignore[arg-type]
            NODE: ConfigRecord({"id": reply.node, "status": reply.status, "reason": ""}),
        },
    )


def _client(context: Context) -> SecAggClient:
    try:
        setup = RoundSetup.from_record(dict(context.state.config_records[_SETUP]))
        state = dict(context.state.config_records[_CLIENT])
    except KeyError:
        raise SecAggError("no secure-aggregation round in progress on this node") from None
    return SecAggClient.restore(setup, state, node_identity(context.node_config))


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
    if _PENDING in context.state:  # it leaves now, masked: its charge is spent for good
        from fedaiot.privacy.budget import PendingRelease

        PendingRelease.from_record(dict(context.state.config_records[_PENDING])).release()
        del context.state[_PENDING]
    return pack(masked.to_record())


def confirm(content: RecordDict, context: Context) -> RecordDict:
    """Sign the survivor sets this node was shown (authenticated rounds), before unmasking."""
    client = _client(context)
    confirmation = client.confirm(ConfirmRequest.from_record(unpack(content)))
    _save(context, client)
    return pack(confirmation.to_record())


def unmask(content: RecordDict, context: Context) -> RecordDict:
    client = _client(context)
    try:
        request = UnmaskRequest.from_record(unpack(content))
        floor = int(context.state.config_records[_FLOOR]["min-survivors"])  # type: ignore[arg-type]
        if len(request.survivors) < floor:
            # the noise share was sized for a sum of at least `floor`: a smaller sum could
            # carry too little noise, so this node reveals nothing towards it
            raise ProtocolViolation(
                f"refuses to unmask a distributed-DP sum of {len(request.survivors)} "
                f"survivors: its noise share was sized for at least {floor}"
            )
        return pack(client.unmask(request).to_record())
    finally:
        forget_round(context)
