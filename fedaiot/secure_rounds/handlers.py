"""The node's side of a securely aggregated round, one function per message.

A round on the node: :func:`advertise` makes fresh keys, :func:`share_keys` shares them, then
one message brings the round's request with the shares addressed to this node: the node checks
it can mask (:func:`ready_to_mask`) before it trains or computes anything, computes, and
:func:`mask` sends the result masked. :func:`unmask` ends the round.

In a run's steady state the first two ride on the previous round's messages: a request to
compute that names the next round's setup is answered with this node's keys for it too
(:func:`advertise_ahead`), and an unmask request that carries the next round's neighbour keys
with this node's shares for it (:func:`share_ahead`). The next round's secrets then wait in a
slot of their own beside the current round's; the first message of the next round (found by
its round id) makes them the current ones and deletes the round before. The two rounds share
nothing: fresh key pairs, a fresh self-mask seed, another round id in every key derivation.

What waits between messages, in ``Context.state`` (memory or storage on the node itself, never
sent): the round's setup and secrets (key pairs, self-mask seed, received shares). The node's
update never waits: it is computed, masked and sent by one handler, and its pending privacy
charge is marked released there, just before the masked vector leaves. A round's secrets are
deleted when it ends, when it is refused, and whenever a new round's keys are made. What
leaves the node: its privacy accounting (epsilon, delta, noise multiplier), public keys,
encrypted shares, the masked vector, and at the end the shares the protocol asks for. A
deployed node also signs its public keys (the ones it advertises ahead too) and the survivor
sets it is shown (:func:`confirm`, before :func:`unmask`) with its identity key, and checks its
neighbours' signatures against its pinned roster (``identity``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
from fedaiot.secure_rounds.wire import NEXT, SHARE_KEYS, flatten, pack, unpack

if TYPE_CHECKING:  # the node module pulls in torch and the tasks: not needed past training
    from fedaiot.wire.replies import NodeReply

_SETUP, _CLIENT, _FLOOR = "secagg-setup", "secagg-client", "secagg-floor"
# the next round's, made ahead: kept apart until a message of that round arrives
_NEXT_SETUP, _NEXT_CLIENT = "secagg-next-setup", "secagg-next-client"
# Kept by the four-stage protocol of earlier versions between stages; never written now, still
# dropped so that no update of theirs can leave.
_EARLIER = ("secagg-update", "secagg-charge")


def forget_round(context: Context) -> None:
    """Drop whatever the current round left on the node: its keys, secrets and survivor floor
    (the next round's keys, made ahead, stay).

    Called when a round ends, is refused, and when the next round begins: once a round is
    forgotten nothing of it can be masked or unmasked any more.
    """
    _drop(context, _SETUP, _CLIENT, _FLOOR, *_EARLIER)


def forget_rounds(context: Context) -> None:
    """Drop the current round and any keys made ahead for the next."""
    _drop(context, _SETUP, _CLIENT, _FLOOR, *_EARLIER, _NEXT_SETUP, _NEXT_CLIENT)


def _drop(context: Context, *names: str) -> None:
    for name in names:
        if name in context.state:
            del context.state[name]


def new_client(setup_record: Mapping[str, Any], context: Context) -> SecAggClient:
    """This node's side of the round the coordinator set up, with its identity: a round this
    node would refuse (unauthenticated, naming it as another institution, naming an
    institution its roster lacks) is refused here, before it trains or spends anything."""
    setup = RoundSetup.from_record({k: v for k, v in setup_record.items() if k != "node"})
    return SecAggClient(
        int(setup_record["node"]),
        setup,
        node_identity(context.node_config),
        colluders(context.run_config, len(setup.node_ids)),
    )


def advertise(setup_record: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """Start a round: fresh keys for the round ``setup_record`` describes (with this node's
    protocol id in ``node``), kept on the node; returns the key advert to send, signed when
    the node has an identity. Whatever earlier rounds left is dropped first."""
    forget_rounds(context)
    return _advertise(setup_record, context, _SETUP, _CLIENT)


def advertise_ahead(setup_record: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """Keys for the next round, made while the current one goes on (which keeps its own):
    the advert rides on this round's masked reply, signed as any advert is."""
    _drop(context, _NEXT_SETUP, _NEXT_CLIENT)
    return _advertise(setup_record, context, _NEXT_SETUP, _NEXT_CLIENT)


def _advertise(
    setup_record: Mapping[str, Any], context: Context, setup_slot: str, client_slot: str
) -> dict[str, Any]:
    client = new_client(setup_record, context)
    advert = client.advertise()
    context.state[setup_slot] = ConfigRecord(client.setup.to_record())  # type: ignore[arg-type]
    _save(context, client, client_slot)
    return advert.to_record()


def _client(context: Context, round_id: int) -> SecAggClient:
    """The node's side of round ``round_id``. The next round's keys, made ahead, become the
    current round's when a message of that round arrives, and the round before is forgotten.
    A message of any other round meets the current round, which refuses it as a replay."""
    records = context.state.config_records
    if _NEXT_SETUP in records and records[_NEXT_SETUP]["round_id"] == round_id:
        made_ahead = records[_NEXT_SETUP], records[_NEXT_CLIENT]
        forget_rounds(context)
        context.state[_SETUP], context.state[_CLIENT] = made_ahead
        records = context.state.config_records
    try:
        setup = RoundSetup.from_record(dict(records[_SETUP]))
        state = dict(records[_CLIENT])
    except KeyError:
        raise SecAggError("no secure-aggregation round in progress on this node") from None
    return SecAggClient.restore(setup, state, node_identity(context.node_config))


def _save(context: Context, client: SecAggClient, slot: str = _CLIENT) -> None:
    context.state[slot] = ConfigRecord(client.export_state())  # type: ignore[arg-type]


def share_keys(content: RecordDict, context: Context) -> RecordDict:
    return pack(_share(unpack(content), context))


def _share(record: Mapping[str, Any], context: Context) -> dict[str, Any]:
    keys = NeighbourKeys.from_record(record)
    client = _client(context, keys.round_id)
    bundle = client.share_keys(keys)
    _save(context, client)
    return bundle.to_record()


def ready_to_mask(content: RecordDict, context: Context) -> tuple[SecAggClient, ForwardedShares]:
    """The round's client and the shares forwarded to it, once it is certain the node can
    mask them: this round, this stage, enough authentic shares. Raises otherwise, before the
    node trains or computes, so that a request it cannot answer costs it no budget."""
    forwarded = ForwardedShares.from_record(unpack(content))
    client = _client(context, forwarded.round_id)
    client.check_masking(forwarded)
    return client, forwarded


def mask(
    reply: NodeReply,
    global_arrays: ArrayRecord | None,
    client: SecAggClient,
    forwarded: ForwardedShares,
    context: Context,
    *,
    private: bool,
    min_survivors: int = 0,
) -> RecordDict:
    """The node's input, masked, as the reply; its charge is marked released just before.

    A trained update is masked as its difference from ``global_arrays``, weighted by the
    node's weight; a vector (a release's, or a distributed-DP round's noisy integer share) as
    it is, with weight 1. A reply without an input (a refusal) takes no further part: the
    round is forgotten and the reply says why, in the clear fields its status allows.
    """
    import numpy as np

    from fedaiot.wire.records import METRICS, NODE, reply_content, wire_mode
    from fedaiot.wire.replies import CONTRIBUTED, TRAINED, clear_metrics

    if reply.status in (CONTRIBUTED, TRAINED) and reply.vector is not None:
        update, weight = np.asarray(reply.vector, dtype=np.float64), 1.0
    elif reply.status == TRAINED and reply.state is not None and global_arrays is not None:
        update = flatten(ArrayRecord(reply.state), order=global_arrays) - flatten(global_arrays)
        weight = reply.weight
    else:
        forget_round(context)
        return reply_content(reply, private=private, secure=True)
    masked = client.masked_input(forwarded, update, weight)
    _save(context, client)
    context.state[_FLOOR] = ConfigRecord({"min-survivors": min_survivors})
    if reply.pending is not None:  # it leaves now, masked: its charge is spent for good
        reply.pending.release()
    mode = wire_mode(reply.status, private=private, secure=True)
    return pack(
        masked.to_record(),
        **{
            METRICS: MetricRecord(clear_metrics(mode, reply.metrics)),  # type: ignore[arg-type]
            NODE: ConfigRecord({"id": reply.node, "status": reply.status, "reason": ""}),
        },
    )


def confirm(content: RecordDict, context: Context) -> RecordDict:
    """Sign the survivor sets this node was shown (authenticated rounds), before unmasking."""
    request = ConfirmRequest.from_record(unpack(content))
    client = _client(context, request.round_id)
    confirmation = client.confirm(request)
    _save(context, client)
    return pack(confirmation.to_record())


def unmask(content: RecordDict, context: Context) -> RecordDict:
    """The shares the coordinator asks for, and, when the request carries the next round's
    neighbour keys, this node's shares for that round (:func:`share_ahead`). The round's
    secrets are deleted before the next round's are touched, and the node refuses a
    distributed-DP sum below the floor its share was sized for."""
    try:  # whatever fails, the round is forgotten: nothing of it can be unmasked later
        request = UnmaskRequest.from_record(unpack(content))
        client = _client(context, request.round_id)
        kept = context.state.config_records.get(_FLOOR)  # none before masking: refused below
        floor = int(kept["min-survivors"]) if kept is not None else 0  # type: ignore[arg-type]
        if len(request.survivors) < floor:
            # the noise share was sized for a sum of at least `floor`: a smaller sum could
            # carry too little noise, so this node reveals nothing towards it
            raise ProtocolViolation(
                f"refuses to unmask a distributed-DP sum of {len(request.survivors)} "
                f"survivors: its noise share was sized for at least {floor}"
            )
        answer = pack(client.unmask(request).to_record())
    finally:
        forget_round(context)
    if NEXT in content.config_records:
        answer[NEXT] = ConfigRecord(share_ahead(dict(content.config_records[NEXT]), context))
    return answer


def share_ahead(keys_record: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """This node's shares for the next round, for its neighbours' keys in ``keys_record``, or
    the reason code of its refusal (a key not signed by its institution, too few neighbours):
    that refusal is the next round's and never costs this round its answer. Logged as a
    refused share stage is."""
    from fedaiot.node.guard import report_failure

    try:
        return _share(keys_record, context)
    except Exception as exc:  # whatever it was, this round's answer still goes out
        forget_rounds(context)
        return {"failed": report_failure(SHARE_KEYS, exc, context)}


def with_keys_ahead(request: RecordDict, reply: RecordDict, context: Context) -> RecordDict:
    """``reply`` to a request to compute, with this node's keys for the next round
    (:func:`advertise_ahead`) when the request names that round's setup."""
    if NEXT in request.config_records:
        advert = advertise_ahead(dict(request.config_records[NEXT]), context)
        reply[NEXT] = ConfigRecord(advert)
    return reply
